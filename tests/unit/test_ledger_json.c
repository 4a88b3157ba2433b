/* Unit tests of the ledger's JSON: command body parsers and event data coding. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "ledger_json.h"

/* Bodies are written as JSON text so that each test reads like the request it models. */
static json_t *load(const char *text)
{
	json_error_t error;
	json_t *v = json_loads(text, JSON_DECODE_ANY, &error);

	cr_assert_not_null(v, "bad test JSON: %s: %s", text, error.text);
	return v;
}

/* Runs one parser on a body that must be refused and checks the detail. */
enum parser { OPEN, MONEY, TRANSFER, CLOSE };

static bool run(enum parser p, json_t *body, char *err, size_t errlen)
{
	struct ledger_open_body open;
	struct ledger_money_body money;
	struct ledger_transfer_body transfer;

	switch (p) {
	case OPEN:
		return ledger_parse_open(body, &open, err, errlen);
	case MONEY:
		return ledger_parse_money(body, &money, err, errlen);
	case TRANSFER:
		return ledger_parse_transfer(body, &transfer, err, errlen);
	case CLOSE:
		return ledger_parse_close(body, err, errlen);
	}
	return false;
}

static void assert_refused(enum parser p, const char *text, const char *detail)
{
	json_t *body = load(text);
	char err[256] = "";

	cr_assert_not(run(p, body, err, sizeof(err)), "accepted %s", text);
	cr_assert_str_eq(err, detail, "for %s", text);
	json_decref(body);
}

static void assert_accepted(enum parser p, const char *text)
{
	json_t *body = load(text);
	char err[256] = "";

	cr_assert(run(p, body, err, sizeof(err)), "refused %s: %s", text, err);
	json_decref(body);
}

/* Builds {"<field>": <value>, ...rest} with a value the JSON text form cannot carry. */
static json_t *with_field(const char *rest, const char *field, json_t *value)
{
	json_t *body = load(rest);

	cr_assert_eq(json_object_set_new(body, field, value), 0);
	return body;
}

#define AMOUNT_RANGE "field 'amount' must be an integer between 1 and 1000000000000000"
#define ID_SHAPE "must be 1-64 characters of [A-Za-z0-9._:-]"
#define NAME_SHAPE "field 'name' must be a non-empty string of at most 200 bytes of UTF-8 text"
#define REFERENCE_SHAPE "field 'reference' must be a string of at most 200 bytes of UTF-8 text"
#define LIMIT_RANGE "field 'overdraft_limit' must be an integer between 0 and 9223372036854775807"

/* Open */

Test(parse_open, full_body)
{
	json_t *body = load("{\"id\":\"acc-1\",\"name\":\"Alice \u00e9\",\"currency\":\"EUR\","
			    "\"overdraft_limit\":2500}");
	struct ledger_open_body b;
	char err[256];

	cr_assert(ledger_parse_open(body, &b, err, sizeof(err)), "%s", err);
	cr_assert_str_eq(b.id, "acc-1");
	cr_assert_str_eq(b.name, "Alice \xc3\xa9");
	cr_assert_str_eq(b.currency, "EUR");
	cr_assert_eq(b.overdraft_limit, 2500);
	/* borrowed from the body, not copied */
	cr_assert_eq(b.id, json_string_value(json_object_get(body, "id")));
	cr_assert_eq(b.name, json_string_value(json_object_get(body, "name")));
	json_decref(body);
}

Test(parse_open, overdraft_limit_defaults_to_zero)
{
	json_t *body = load("{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\"}");
	struct ledger_open_body b = { .overdraft_limit = 77 };
	char err[256];

	cr_assert(ledger_parse_open(body, &b, err, sizeof(err)), "%s", err);
	cr_assert_eq(b.overdraft_limit, 0);
	json_decref(body);
}

/* An open body with a valid id, name and currency, and this overdraft_limit. */
#define OPEN_WITH_LIMIT(v)                                                                         \
	"{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\",\"overdraft_limit\":" v "}"

Test(parse_open, overdraft_limit_range_and_type)
{
	assert_accepted(OPEN, OPEN_WITH_LIMIT("0"));
	assert_accepted(OPEN, OPEN_WITH_LIMIT("9223372036854775807"));
	assert_refused(OPEN, OPEN_WITH_LIMIT("-1"), LIMIT_RANGE);
	assert_refused(OPEN, OPEN_WITH_LIMIT("1.0"), LIMIT_RANGE);
	assert_refused(OPEN, OPEN_WITH_LIMIT("\"5\""), LIMIT_RANGE);
	assert_refused(OPEN, OPEN_WITH_LIMIT("null"), LIMIT_RANGE);
	assert_refused(OPEN, OPEN_WITH_LIMIT("true"), LIMIT_RANGE);
}

Test(parse_open, required_fields)
{
	assert_refused(OPEN, "{\"name\":\"A\",\"currency\":\"EUR\"}", "field 'id' is required");
	assert_refused(OPEN, "{\"id\":\"a\",\"currency\":\"EUR\"}", "field 'name' is required");
	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"A\"}", "field 'currency' is required");
	assert_refused(OPEN, "{}", "field 'id' is required");
}

Test(parse_open, id_shape)
{
	const char *detail = "field 'id' " ID_SHAPE;

	assert_refused(OPEN, "{\"id\":\"\",\"name\":\"A\",\"currency\":\"EUR\"}", detail);
	assert_refused(OPEN, "{\"id\":\"a b\",\"name\":\"A\",\"currency\":\"EUR\"}", detail);
	assert_refused(OPEN, "{\"id\":\"a/b\",\"name\":\"A\",\"currency\":\"EUR\"}", detail);
	assert_refused(OPEN, "{\"id\":12,\"name\":\"A\",\"currency\":\"EUR\"}", detail);
	assert_refused(OPEN, "{\"id\":null,\"name\":\"A\",\"currency\":\"EUR\"}", detail);
	assert_refused(OPEN, "{\"id\":[\"a\"],\"name\":\"A\",\"currency\":\"EUR\"}", detail);
	assert_refused(OPEN,
		       "{\"id\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\","
		       "\"name\":\"A\",\"currency\":\"EUR\"}",
		       detail);
	assert_accepted(OPEN,
			"{\"id\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\","
			"\"name\":\"A\",\"currency\":\"EUR\"}");
}

Test(parse_open, id_with_embedded_nul_is_refused)
{
	/* "a\0b" would pass as "a" if the parser trusted strlen. */
	json_t *body = with_field("{\"name\":\"A\",\"currency\":\"EUR\"}", "id",
				  json_stringn("a\0b", 3));
	struct ledger_open_body b;
	char err[256];

	cr_assert_not(ledger_parse_open(body, &b, err, sizeof(err)));
	cr_assert_str_eq(err, "field 'id' " ID_SHAPE);
	json_decref(body);
}

Test(parse_open, currency_shape)
{
	const char *detail = "field 'currency' must be three upper-case letters";

	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"eur\"}", detail);
	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EURO\"}", detail);
	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EU\"}", detail);
	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"A\",\"currency\":978}", detail);
}

Test(parse_open, name_rules)
{
	char text[512];
	char name[202];

	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"\",\"currency\":\"EUR\"}", NAME_SHAPE);
	assert_refused(OPEN, "{\"id\":\"a\",\"name\":7,\"currency\":\"EUR\"}", NAME_SHAPE);
	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"line\\nbreak\",\"currency\":\"EUR\"}",
		       NAME_SHAPE);
	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"del\\u007f\",\"currency\":\"EUR\"}",
		       NAME_SHAPE);

	memset(name, 'n', 200);
	name[200] = '\0';
	snprintf(text, sizeof(text), "{\"id\":\"a\",\"name\":\"%s\",\"currency\":\"EUR\"}", name);
	assert_accepted(OPEN, text);
	name[200] = 'n';
	name[201] = '\0';
	snprintf(text, sizeof(text), "{\"id\":\"a\",\"name\":\"%s\",\"currency\":\"EUR\"}", name);
	assert_refused(OPEN, text, NAME_SHAPE);
}

Test(parse_open, name_that_is_not_utf8_is_refused)
{
	/* json_loads would refuse this text itself; a body built in code must be checked too. */
	json_t *body = with_field("{\"id\":\"a\",\"currency\":\"EUR\"}", "name",
				  json_stringn_nocheck("\xed\xa0\x80", 3));
	struct ledger_open_body b;
	char err[256];

	cr_assert_not(ledger_parse_open(body, &b, err, sizeof(err)));
	cr_assert_str_eq(err, NAME_SHAPE);
	json_decref(body);
}

Test(parse_open, refusal_leaves_out_untouched)
{
	json_t *body = load("{\"id\":\"a\",\"name\":\"A\",\"currency\":\"eur\"}");
	struct ledger_open_body b = { .id = "keep", .overdraft_limit = 9 };
	char err[256];

	cr_assert_not(ledger_parse_open(body, &b, err, sizeof(err)));
	cr_assert_str_eq(b.id, "keep");
	cr_assert_eq(b.overdraft_limit, 9);
	json_decref(body);
}

/* Shared rules */

Test(parse_any, body_must_be_an_object)
{
	static const char *const bodies[] = { "[]", "\"x\"", "12", "null", "true" };

	for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
		assert_refused(OPEN, bodies[i], "body must be a JSON object");
		assert_refused(MONEY, bodies[i], "body must be a JSON object");
		assert_refused(TRANSFER, bodies[i], "body must be a JSON object");
		assert_refused(CLOSE, bodies[i], "body must be a JSON object");
	}
	cr_assert_not(run(OPEN, NULL, NULL, 0));
	cr_assert_not(run(MONEY, NULL, NULL, 0));
	cr_assert_not(run(TRANSFER, NULL, NULL, 0));
}

Test(parse_any, unknown_field_is_refused_before_missing_ones)
{
	assert_refused(OPEN, "{\"id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\",\"foo\":1}",
		       "unknown field 'foo'");
	assert_refused(MONEY, "{\"foo\":1}", "unknown field 'foo'");
	assert_refused(TRANSFER, "{\"amount\":1,\"Reference\":\"x\"}", "unknown field 'Reference'");
	assert_refused(CLOSE, "{\"reason\":\"done\"}", "unknown field 'reason'");
	/* a field of another command is unknown here */
	assert_refused(MONEY, "{\"amount\":1,\"currency\":\"EUR\"}", "unknown field 'currency'");
}

Test(parse_any, long_unknown_field_name_is_cut_short)
{
	char name[300], text[400], detail[100];

	memset(name, 'k', 299);
	name[299] = '\0';
	snprintf(text, sizeof(text), "{\"%s\":1}", name);
	snprintf(detail, sizeof(detail), "unknown field '%.64s'", name);
	assert_refused(MONEY, text, detail);
}

Test(parse_any, long_unknown_field_name_is_cut_between_characters)
{
	char name[100] = "", text[200], detail[100];

	/* 30 euro signs, 3 bytes each: 64 bytes would end inside the 22nd */
	for (int i = 0; i < 30; i++)
		strcat(name, "\xe2\x82\xac");
	snprintf(text, sizeof(text), "{\"%s\":1}", name);
	snprintf(detail, sizeof(detail), "unknown field '%.63s'", name);
	assert_refused(MONEY, text, detail);
}

Test(parse_any, detail_is_truncated_to_errlen)
{
	json_t *body = load("[]");
	char err[8];

	memset(err, 'X', sizeof(err));
	cr_assert_not(run(MONEY, body, err, sizeof(err)));
	cr_assert_str_eq(err, "body mu");
	json_decref(body);
}

Test(parse_any, null_error_buffer_is_allowed)
{
	json_t *body = load("{\"amount\":0}");

	cr_assert_not(run(MONEY, body, NULL, 0));
	json_decref(body);
}

/* Money */

Test(parse_money, amount_and_reference)
{
	json_t *body = load("{\"amount\":1250,\"reference\":\"inv-7\"}");
	struct ledger_money_body b;
	char err[256];

	cr_assert(ledger_parse_money(body, &b, err, sizeof(err)), "%s", err);
	cr_assert_eq(b.amount, 1250);
	cr_assert_str_eq(b.reference, "inv-7");
	json_decref(body);
}

Test(parse_money, reference_absent_is_null_empty_is_empty)
{
	json_t *absent = load("{\"amount\":1}");
	json_t *empty = load("{\"amount\":1,\"reference\":\"\"}");
	struct ledger_money_body b = { .reference = "stale" };
	char err[256];

	cr_assert(ledger_parse_money(absent, &b, err, sizeof(err)), "%s", err);
	cr_assert_null(b.reference);
	cr_assert(ledger_parse_money(empty, &b, err, sizeof(err)), "%s", err);
	cr_assert_not_null(b.reference);
	cr_assert_str_eq(b.reference, "");
	json_decref(absent);
	json_decref(empty);
}

Test(parse_money, amount_bounds)
{
	json_t *body = load("{\"amount\":1000000000000000}");
	struct ledger_money_body b;
	char err[256];

	cr_assert(ledger_parse_money(body, &b, err, sizeof(err)), "%s", err);
	cr_assert_eq(b.amount, INT64_C(1000000000000000));
	assert_accepted(MONEY, "{\"amount\":1}");
	assert_refused(MONEY, "{\"amount\":1000000000000001}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":0}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":-5}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":9223372036854775807}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":-9223372036854775808}", AMOUNT_RANGE);
	json_decref(body);
}

Test(parse_money, amount_must_be_a_json_integer)
{
	assert_refused(MONEY, "{\"amount\":1.0}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":1e2}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":10.5}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":\"100\"}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":true}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":null}", AMOUNT_RANGE);
	assert_refused(MONEY, "{\"amount\":{}}", AMOUNT_RANGE);
	assert_refused(MONEY, "{}", "field 'amount' is required");
	assert_refused(MONEY, "{\"reference\":\"x\"}", "field 'amount' is required");
}

Test(parse_money, reference_rules)
{
	char text[512], ref[202];

	assert_refused(MONEY, "{\"amount\":1,\"reference\":null}", REFERENCE_SHAPE);
	assert_refused(MONEY, "{\"amount\":1,\"reference\":42}", REFERENCE_SHAPE);
	assert_refused(MONEY, "{\"amount\":1,\"reference\":\"tab\\there\"}", REFERENCE_SHAPE);
	memset(ref, 'r', 200);
	ref[200] = '\0';
	snprintf(text, sizeof(text), "{\"amount\":1,\"reference\":\"%s\"}", ref);
	assert_accepted(MONEY, text);
	ref[200] = 'r';
	ref[201] = '\0';
	snprintf(text, sizeof(text), "{\"amount\":1,\"reference\":\"%s\"}", ref);
	assert_refused(MONEY, text, REFERENCE_SHAPE);
}

Test(parse_money, reference_length_counts_utf8_bytes)
{
	/* 100 two-byte characters is 200 bytes, 101 is 202. */
	char text[600];
	size_t n = (size_t)snprintf(text, sizeof(text), "{\"amount\":1,\"reference\":\"");

	for (int i = 0; i < 100; i++)
		n += (size_t)snprintf(text + n, sizeof(text) - n, "\xc3\xa9");
	snprintf(text + n, sizeof(text) - n, "\"}");
	assert_accepted(MONEY, text);
	n += (size_t)snprintf(text + n, sizeof(text) - n, "\xc3\xa9");
	snprintf(text + n, sizeof(text) - n, "\"}");
	assert_refused(MONEY, text, REFERENCE_SHAPE);
}

/* Transfer */

Test(parse_transfer, full_body)
{
	json_t *body = load("{\"id\":\"t-1\",\"from\":\"alice\",\"to\":\"bob\",\"amount\":300,"
			    "\"reference\":\"lunch\"}");
	struct ledger_transfer_body b;
	char err[256];

	cr_assert(ledger_parse_transfer(body, &b, err, sizeof(err)), "%s", err);
	cr_assert_str_eq(b.id, "t-1");
	cr_assert_str_eq(b.from, "alice");
	cr_assert_str_eq(b.to, "bob");
	cr_assert_eq(b.amount, 300);
	cr_assert_str_eq(b.reference, "lunch");
	json_decref(body);
}

Test(parse_transfer, same_account_is_left_to_the_domain)
{
	json_t *body = load("{\"id\":\"t\",\"from\":\"a\",\"to\":\"a\",\"amount\":1}");
	struct ledger_transfer_body b;
	char err[256];

	cr_assert(ledger_parse_transfer(body, &b, err, sizeof(err)), "%s", err);
	cr_assert_null(b.reference);
	json_decref(body);
}

Test(parse_transfer, required_fields)
{
	assert_refused(TRANSFER, "{\"from\":\"a\",\"to\":\"b\",\"amount\":1}",
		       "field 'id' is required");
	assert_refused(TRANSFER, "{\"id\":\"t\",\"to\":\"b\",\"amount\":1}",
		       "field 'from' is required");
	assert_refused(TRANSFER, "{\"id\":\"t\",\"from\":\"a\",\"amount\":1}",
		       "field 'to' is required");
	assert_refused(TRANSFER, "{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\"}",
		       "field 'amount' is required");
}

Test(parse_transfer, field_shapes)
{
	assert_refused(TRANSFER, "{\"id\":\"t 1\",\"from\":\"a\",\"to\":\"b\",\"amount\":1}",
		       "field 'id' " ID_SHAPE);
	assert_refused(TRANSFER, "{\"id\":\"t\",\"from\":\"\",\"to\":\"b\",\"amount\":1}",
		       "field 'from' " ID_SHAPE);
	assert_refused(TRANSFER, "{\"id\":\"t\",\"from\":\"a\",\"to\":5,\"amount\":1}",
		       "field 'to' " ID_SHAPE);
	assert_refused(TRANSFER, "{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":2.5}",
		       AMOUNT_RANGE);
	assert_refused(TRANSFER, "{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":0}",
		       AMOUNT_RANGE);
	assert_refused(TRANSFER,
		       "{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":1,\"reference\":null}",
		       REFERENCE_SHAPE);
}

/* Close */

Test(parse_close, empty_body_or_empty_object)
{
	char err[256];

	cr_assert(ledger_parse_close(NULL, err, sizeof(err)));
	assert_accepted(CLOSE, "{}");
	assert_refused(CLOSE, "{\"x\":1}", "unknown field 'x'");
}

/* Event data */

static char *dump(const struct ledger_event *ev)
{
	json_t *data = ledger_event_to_json(ev);
	char *text;

	cr_assert_not_null(data);
	text = json_dumps(data, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(data);
	return text;
}

static void assert_dump(const struct ledger_event *ev, const char *expected)
{
	char *text = dump(ev);

	cr_assert_str_eq(text, expected);
	free(text);
}

Test(event_json, account_opened)
{
	struct ledger_event ev = { .type = LEDGER_ACCOUNT_OPENED,
				   .account_id = "acc-1",
				   .name = "Alice",
				   .currency = "EUR",
				   .overdraft_limit = 500 };

	assert_dump(&ev, "{\"account_id\":\"acc-1\",\"currency\":\"EUR\",\"name\":\"Alice\","
			 "\"overdraft_limit\":500}");
}

Test(event_json, deposits_and_withdrawals)
{
	struct ledger_event ev = { .type = LEDGER_FUNDS_DEPOSITED,
				   .amount = 100,
				   .reference = "x" };

	assert_dump(&ev, "{\"amount\":100,\"reference\":\"x\"}");
	ev.type = LEDGER_FUNDS_WITHDRAWN;
	ev.reference = NULL;
	assert_dump(&ev, "{\"amount\":100}");
	ev.reference = "";
	assert_dump(&ev, "{\"amount\":100,\"reference\":\"\"}");
}

Test(event_json, transfers)
{
	struct ledger_event ev = { .type = LEDGER_TRANSFER_SENT,
				   .transfer_id = "t-1",
				   .counterparty = "bob",
				   .amount = 300,
				   .reference = "r" };

	assert_dump(&ev,
		    "{\"amount\":300,\"reference\":\"r\",\"to\":\"bob\",\"transfer_id\":\"t-1\"}");
	ev.type = LEDGER_TRANSFER_RECEIVED;
	ev.counterparty = "alice";
	ev.reference = NULL;
	assert_dump(&ev, "{\"amount\":300,\"from\":\"alice\",\"transfer_id\":\"t-1\"}");
}

Test(event_json, account_closed_is_empty)
{
	struct ledger_event ev = { .type = LEDGER_ACCOUNT_CLOSED_EVENT, .amount = 5 };

	assert_dump(&ev, "{}");
}

Test(event_json, money_stays_integer_at_the_edges)
{
	struct ledger_event ev = { .type = LEDGER_FUNDS_DEPOSITED, .amount = INT64_MAX };
	json_t *data = ledger_event_to_json(&ev);

	cr_assert(json_is_integer(json_object_get(data, "amount")));
	cr_assert_eq(json_integer_value(json_object_get(data, "amount")), INT64_MAX);
	json_decref(data);
	ev = (struct ledger_event){ .type = LEDGER_ACCOUNT_OPENED,
				    .account_id = "a",
				    .name = "A",
				    .currency = "EUR",
				    .overdraft_limit = INT64_MAX };
	assert_dump(&ev, "{\"account_id\":\"a\",\"currency\":\"EUR\",\"name\":\"A\","
			 "\"overdraft_limit\":9223372036854775807}");
}

Test(event_json, unusable_events_give_null)
{
	struct ledger_event unknown = { .type = (enum ledger_event_type)0, .amount = 1 };
	struct ledger_event no_name = { .type = LEDGER_ACCOUNT_OPENED,
					.account_id = "a",
					.currency = "EUR" };
	struct ledger_event no_to = { .type = LEDGER_TRANSFER_SENT,
				      .transfer_id = "t",
				      .amount = 1 };

	struct ledger_event not_utf8 = { .type = LEDGER_FUNDS_DEPOSITED,
					 .amount = 1,
					 .reference = "\xff" };
	struct ledger_text t = { 0 };

	cr_assert_null(ledger_event_to_json(&unknown));
	cr_assert_null(ledger_event_to_json(&no_name));
	cr_assert_null(ledger_event_to_json(&no_to));
	cr_assert_null(ledger_event_to_json(NULL));
	cr_assert_null(ledger_event_to_json(&not_utf8));
	/* No text for them either; a string jansson refuses fails the text. */
	cr_assert_not(ledger_event_data_text(&unknown, &t));
	cr_assert_not(ledger_event_data_text(NULL, &t));
	cr_assert_eq(t.len, 0);
	cr_assert_not(ledger_event_data_text(&no_name, &t));
	cr_assert(t.failed);
	t.failed = false;
	cr_assert_not(ledger_event_data_text(&no_to, &t));
	t.failed = false;
	cr_assert_not(ledger_event_data_text(&not_utf8, &t));
	cr_assert(t.failed);
	ledger_text_free(&t);
}

/* The hand-built text is byte for byte what jansson makes of the object. */
static void assert_text_is_dump(const struct ledger_event *ev)
{
	json_t *data = ledger_event_to_json(ev);
	char *want = data ? json_dumps(data, JSON_COMPACT) : NULL;
	struct ledger_text t = { 0 };

	ledger_text_raw(&t, "x", 1); /* appended after what t holds */
	cr_assert_eq(ledger_event_data_text(ev, &t), want != NULL);
	if (want) {
		ledger_text_raw(&t, "", 1);
		cr_assert_str_eq(t.p + 1, want);
	} else {
		cr_assert_eq(t.len, 1);
	}
	cr_assert_eq(t.p[0], 'x');
	free(want);
	json_decref(data);
	ledger_text_free(&t);
}

Test(event_json, the_text_of_every_event_is_jansson_s_dump_whatever_its_strings)
{
	const char *texts[] = {
		"plain",     "quote \" back \\ slash",  "caf\xc3\xa9 \xf0\x9f\x98\x80",
		"tab\there", "nl\nctl\x01\x1f del\x7f", "",
		"/slash/"
	};
	const int64_t amounts[] = { 1, 0, -1, INT64_MAX, INT64_MIN, 1000000000000000 };

	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
		for (size_t a = 0; a < sizeof(amounts) / sizeof(amounts[0]); a++) {
			struct ledger_event ev[] = {
				{ .type = LEDGER_ACCOUNT_OPENED,
				  .account_id = texts[i],
				  .name = texts[i],
				  .currency = "EUR",
				  .overdraft_limit = amounts[a] },
				{ .type = LEDGER_FUNDS_DEPOSITED,
				  .amount = amounts[a],
				  .reference = texts[i] },
				{ .type = LEDGER_FUNDS_WITHDRAWN, .amount = amounts[a] },
				{ .type = LEDGER_TRANSFER_SENT,
				  .transfer_id = texts[i],
				  .counterparty = "bob",
				  .amount = amounts[a],
				  .reference = texts[i] },
				{ .type = LEDGER_TRANSFER_RECEIVED,
				  .transfer_id = "t",
				  .counterparty = texts[i],
				  .amount = amounts[a] },
				{ .type = LEDGER_ACCOUNT_CLOSED_EVENT },
			};
			for (size_t e = 0; e < sizeof(ev) / sizeof(ev[0]); e++)
				assert_text_is_dump(&ev[e]);
		}
	}
}

Test(parse_json, a_plain_transfer_is_read_from_its_text_and_anything_else_is_left_to_jansson)
{
	static const char *const left[] = {
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":5,\"id\":\"u\"}",
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":5,\"x\":1}",
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":0}",
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":5.0}",
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":\"5\"}",
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\"}",
		"{\"id\":\"t u\",\"from\":\"a\",\"to\":\"b\",\"amount\":5}",
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":5,\"reference\":\"\\n\"}",
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":5,\"reference\":\"caf\xc3\xa9\"}",
		"{\"id\":\"t\",\"from\":\"a\",\"to\":\"b\",\"amount\":5} x",
		"[\"id\"]",
	};
	const char *plain = " {\"id\":\"t-1\", \"from\" : \"a1\",\"to\":\"a2\",\"amount\":100,"
			    "\"reference\":\"rent\"}\n";
	struct ledger_event_buf buf = { 0 };
	struct ledger_transfer_body b;

	cr_assert(ledger_transfer_from_text(plain, strlen(plain), &buf, &b));
	cr_assert_str_eq(b.id, "t-1");
	cr_assert_str_eq(b.from, "a1");
	cr_assert_str_eq(b.to, "a2");
	cr_assert_eq(b.amount, 100);
	cr_assert_str_eq(b.reference, "rent");
	cr_assert(ledger_transfer_from_text(plain, strlen(plain) - 27, &buf, &b) == false);
	for (size_t i = 0; i < sizeof(left) / sizeof(left[0]); i++)
		cr_assert_not(ledger_transfer_from_text(left[i], strlen(left[i]), &buf, &b), "%s",
			      left[i]);
	ledger_event_buf_free(&buf);
}

static void assert_str_or_null(const char *a, const char *b)
{
	if (!a || !b)
		cr_assert_eq(a, b);
	else
		cr_assert_str_eq(a, b);
}

/* Through text, as the log stores it, and back; account_id only survives for
 * AccountOpened, as the other events' data does not carry it. */
static void assert_round_trip(const struct ledger_event *ev)
{
	char *text = dump(ev);
	json_t *data = load(text);
	struct ledger_event back;

	cr_assert(ledger_event_from_json(ev->type, data, &back), "%s", text);
	cr_assert_eq(back.type, ev->type);
	assert_str_or_null(back.account_id, ev->account_id);
	assert_str_or_null(back.name, ev->name);
	assert_str_or_null(back.currency, ev->currency);
	cr_assert_eq(back.overdraft_limit, ev->overdraft_limit);
	cr_assert_eq(back.amount, ev->amount);
	assert_str_or_null(back.reference, ev->reference);
	assert_str_or_null(back.transfer_id, ev->transfer_id);
	assert_str_or_null(back.counterparty, ev->counterparty);
	json_decref(data);
	free(text);
}

Test(event_json, round_trip_every_type)
{
	const struct ledger_event events[] = {
		{ .type = LEDGER_ACCOUNT_OPENED,
		  .account_id = "acc-1",
		  .name = "Ann \xe2\x82\xac",
		  .currency = "EUR",
		  .overdraft_limit = INT64_MAX },
		{ .type = LEDGER_ACCOUNT_OPENED,
		  .account_id = "acc-2",
		  .name = "B",
		  .currency = "USD" },
		{ .type = LEDGER_FUNDS_DEPOSITED,
		  .amount = 1000000000000000,
		  .reference = "salary" },
		{ .type = LEDGER_FUNDS_DEPOSITED, .amount = 1 },
		{ .type = LEDGER_FUNDS_WITHDRAWN, .amount = 40, .reference = "" },
		{ .type = LEDGER_TRANSFER_SENT,
		  .transfer_id = "t-1",
		  .counterparty = "bob",
		  .amount = 300,
		  .reference = "lunch" },
		{ .type = LEDGER_TRANSFER_RECEIVED,
		  .transfer_id = "t-1",
		  .counterparty = "alice",
		  .amount = 300 },
		{ .type = LEDGER_ACCOUNT_CLOSED_EVENT },
	};

	for (size_t i = 0; i < sizeof(events) / sizeof(events[0]); i++)
		assert_round_trip(&events[i]);
}

Test(event_json, decided_events_round_trip_and_fold_the_same)
{
	struct ledger_account a = { 0 }, b = { 0 }, a2 = { 0 }, b2 = { 0 };
	struct ledger_event ev[6];

	cr_assert_eq(ledger_decide_open(&a, "alice", "Alice", "EUR", 10, &ev[0]), LEDGER_OK);
	cr_assert(ledger_evolve(&a, &ev[0]));
	cr_assert_eq(ledger_decide_open(&b, "bob", "Bob", "EUR", 0, &ev[1]), LEDGER_OK);
	cr_assert(ledger_evolve(&b, &ev[1]));
	cr_assert_eq(ledger_decide_deposit(&a, -1, 100, "in", &ev[2]), LEDGER_OK);
	cr_assert(ledger_evolve(&a, &ev[2]));
	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 110, NULL, &ev[3]), LEDGER_OK);
	cr_assert(ledger_evolve(&a, &ev[3]));
	cr_assert(ledger_evolve(&b, &ev[4]));

	/* replay a's stream (0, 2, 3) and b's (1, 4) through JSON */
	static const int stream_a[] = { 0, 2, 3 }, stream_b[] = { 1, 4 };
	for (size_t i = 0; i < 3; i++) {
		json_t *data = ledger_event_to_json(&ev[stream_a[i]]);
		struct ledger_event back;

		cr_assert(ledger_event_from_json(ev[stream_a[i]].type, data, &back));
		cr_assert(ledger_evolve(&a2, &back));
		json_decref(data);
	}
	for (size_t i = 0; i < 2; i++) {
		json_t *data = ledger_event_to_json(&ev[stream_b[i]]);
		struct ledger_event back;

		cr_assert(ledger_event_from_json(ev[stream_b[i]].type, data, &back));
		cr_assert(ledger_evolve(&b2, &back));
		json_decref(data);
	}
	cr_assert_eq(a2.balance, -10);
	cr_assert_eq(a2.version, 3);
	cr_assert_str_eq(a2.id, "alice");
	cr_assert_eq(a2.overdraft_limit, 10);
	cr_assert_eq(b2.balance, 110);
	cr_assert_eq(b2.version, 2);
	cr_assert_eq(a2.balance, a.balance);
	cr_assert_eq(b2.balance, b.balance);
}

Test(event_from_json, strings_are_borrowed_from_data)
{
	json_t *data = load(
		"{\"transfer_id\":\"t\",\"to\":\"bob\",\"amount\":5,\"reference\":\"r\"}");
	struct ledger_event ev;

	cr_assert(ledger_event_from_json(LEDGER_TRANSFER_SENT, data, &ev));
	cr_assert_eq(ev.transfer_id, json_string_value(json_object_get(data, "transfer_id")));
	cr_assert_eq(ev.counterparty, json_string_value(json_object_get(data, "to")));
	cr_assert_eq(ev.reference, json_string_value(json_object_get(data, "reference")));
	cr_assert_null(ev.account_id);
	json_decref(data);
}

Test(event_from_json, extra_keys_are_tolerated)
{
	json_t *data = load("{\"amount\":5,\"added_later\":true}");
	json_t *closed = load("{\"reason\":\"x\"}");
	struct ledger_event ev;

	cr_assert(ledger_event_from_json(LEDGER_FUNDS_DEPOSITED, data, &ev));
	cr_assert_eq(ev.amount, 5);
	cr_assert(ledger_event_from_json(LEDGER_ACCOUNT_CLOSED_EVENT, closed, &ev));
	cr_assert_eq(ev.type, LEDGER_ACCOUNT_CLOSED_EVENT);
	json_decref(data);
	json_decref(closed);
}

static void assert_undecodable(enum ledger_event_type type, const char *text)
{
	json_t *data = load(text);
	struct ledger_event ev = { .type = 99, .amount = 4242 };

	cr_assert_not(ledger_event_from_json(type, data, &ev), "decoded %s", text);
	cr_assert_eq(ev.type, 99);
	cr_assert_eq(ev.amount, 4242);
	json_decref(data);
}

Test(event_from_json, missing_or_mistyped_fields)
{
	assert_undecodable(LEDGER_ACCOUNT_OPENED,
			   "{\"name\":\"A\",\"currency\":\"EUR\",\"overdraft_limit\":0}");
	assert_undecodable(LEDGER_ACCOUNT_OPENED,
			   "{\"account_id\":\"a\",\"currency\":\"EUR\",\"overdraft_limit\":0}");
	assert_undecodable(LEDGER_ACCOUNT_OPENED,
			   "{\"account_id\":\"a\",\"name\":\"A\",\"overdraft_limit\":0}");
	assert_undecodable(LEDGER_ACCOUNT_OPENED,
			   "{\"account_id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\"}");
	assert_undecodable(
		LEDGER_ACCOUNT_OPENED,
		"{\"account_id\":1,\"name\":\"A\",\"currency\":\"EUR\",\"overdraft_limit\":0}");
	assert_undecodable(LEDGER_ACCOUNT_OPENED,
			   "{\"account_id\":\"a\",\"name\":\"A\",\"currency\":\"EUR\","
			   "\"overdraft_limit\":0.0}");
	assert_undecodable(LEDGER_FUNDS_DEPOSITED, "{}");
	assert_undecodable(LEDGER_FUNDS_DEPOSITED, "{\"amount\":1.0}");
	assert_undecodable(LEDGER_FUNDS_WITHDRAWN, "{\"amount\":\"1\"}");
	assert_undecodable(LEDGER_FUNDS_WITHDRAWN, "{\"amount\":1,\"reference\":null}");
	assert_undecodable(LEDGER_FUNDS_WITHDRAWN, "{\"amount\":1,\"reference\":3}");
	assert_undecodable(LEDGER_TRANSFER_SENT, "{\"transfer_id\":\"t\",\"amount\":1}");
	assert_undecodable(LEDGER_TRANSFER_SENT,
			   "{\"transfer_id\":\"t\",\"from\":\"a\",\"amount\":1}");
	assert_undecodable(LEDGER_TRANSFER_RECEIVED,
			   "{\"transfer_id\":\"t\",\"to\":\"b\",\"amount\":1}");
	assert_undecodable(LEDGER_TRANSFER_RECEIVED, "{\"from\":\"a\",\"amount\":1}");
	assert_undecodable(LEDGER_TRANSFER_RECEIVED, "{\"transfer_id\":\"t\",\"from\":\"a\"}");
}

Test(event_from_json, data_must_be_an_object_of_a_known_type)
{
	assert_undecodable(LEDGER_ACCOUNT_CLOSED_EVENT, "[]");
	assert_undecodable(LEDGER_FUNDS_DEPOSITED, "5");
	assert_undecodable((enum ledger_event_type)0, "{\"amount\":1}");
	assert_undecodable((enum ledger_event_type)42, "{}");
	cr_assert_not(ledger_event_from_json(LEDGER_ACCOUNT_CLOSED_EVENT, NULL,
					     &(struct ledger_event){ 0 }));
}

/* --- event data from text: the same answers as through jansson ----------------------- */

static bool same_str(const char *a, const char *b)
{
	return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Decode text both ways, for every event type, and demand the same verdict and the
 * same event. Returns how many types accepted it. */
static int assert_text_like_json(const char *text)
{
	static const enum ledger_event_type types[] = {
		LEDGER_ACCOUNT_OPENED, LEDGER_FUNDS_DEPOSITED,   LEDGER_FUNDS_WITHDRAWN,
		LEDGER_TRANSFER_SENT,  LEDGER_TRANSFER_RECEIVED, LEDGER_ACCOUNT_CLOSED_EVENT,
	};
	struct ledger_event_buf buf = { 0 };
	json_t *data = json_loads(text, 0, NULL);
	int accepted = 0;

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		struct ledger_event a = { 0 }, b = { 0 };
		bool via_json = data && ledger_event_from_json(types[i], data, &a);
		bool via_text = ledger_event_from_text(types[i], text, strlen(text), &buf, &b);

		cr_assert_eq(via_text, via_json, "type %d, %s: text %d, json %d", types[i], text,
			     via_text, via_json);
		if (!via_json)
			continue;
		accepted++;
		cr_assert(same_str(a.account_id, b.account_id) && same_str(a.name, b.name) &&
				  same_str(a.currency, b.currency) &&
				  same_str(a.reference, b.reference) &&
				  same_str(a.transfer_id, b.transfer_id) &&
				  same_str(a.counterparty, b.counterparty) &&
				  a.overdraft_limit == b.overdraft_limit && a.amount == b.amount,
			  "type %d, %s decodes differently", types[i], text);
	}
	json_decref(data);
	ledger_event_buf_free(&buf);
	return accepted;
}

Test(event_from_text, agrees_with_jansson_on_plain_and_odd_data)
{
	static const char *const texts[] = {
		/* as PostgreSQL's jsonb prints them, and compact */
		"{\"name\": \"Alice\", \"currency\": \"EUR\", \"account_id\": \"a-1\", \"overdraft_limit\": 0}",
		"{\"amount\":57,\"reference\":\"bench\"}",
		"{\"amount\": 9223372036854775807}",
		"{\"amount\": -9223372036854775808}",
		"{\"to\": \"b\", \"amount\": 5, \"transfer_id\": \"t-1\"}",
		"{\"from\": \"a\", \"amount\": 5, \"reference\": \"\", \"transfer_id\": \"t-1\"}",
		"{}",
		" { } ",
		"\t{\r\n\"amount\" :\n1 }\n",
		/* jansson's business: escapes, UTF-8, nesting, other literals */
		"{\"amount\": 5, \"reference\": \"q\\\"uote \\\\ \\u00e9\\n\"}",
		"{\"amount\": 5, \"reference\": \"caf\xc3\xa9\"}",
		"{\"amount\": 5, \"reference\": \"nul\\u0000cut\"}",
		"{\"amount\": 5, \"extra\": {\"nested\": [1, 2.5, true, null]}}",
		"{\"amount\": 5, \"reference\": null}",
		"{\"amount\": true}",
		/* numbers at and past the edges */
		"{\"amount\": 9223372036854775808}",
		"{\"amount\": -9223372036854775809}",
		"{\"amount\": 1.0}",
		"{\"amount\": 1e3}",
		"{\"amount\": 1E3}",
		"{\"amount\": 01}",
		"{\"amount\": -0}",
		"{\"amount\": -}",
		"{\"amount\": +1}",
		"{\"amount\": 0x10}",
		/* repeated keys: the last one counts */
		"{\"amount\": 1, \"amount\": 2}",
		"{\"amount\": \"x\", \"amount\": 3}",
		"{\"amount\": 3, \"amount\": \"x\"}",
		/* broken text */
		"",
		"{",
		"}",
		"[]",
		"{\"amount\": 1,}",
		"{\"amount\": 1} x",
		"{\"amount\" 1}",
		"{amount: 1}",
		"{\"amount\": 1, \"reference\": \"open}",
		"{\"amount\": \"a\tb\"}",
		"{\"amount\": 5, \"reference\": \"del\x7f\"}",
		"\"amount\"",
		"5",
	};
	int accepted = 0;

	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
		accepted += assert_text_like_json(texts[i]);
	cr_assert_gt(accepted, 10, "the corpus must hold data that decodes");
}

Test(event_from_text, strings_outlive_nothing_but_the_next_use_of_the_buffer)
{
	struct ledger_event_buf buf = { 0 };
	struct ledger_event ev;
	const char *text = "{\"amount\": 5, \"reference\": \"first\"}";

	cr_assert(ledger_event_from_text(LEDGER_FUNDS_DEPOSITED, text, strlen(text), &buf, &ev));
	cr_assert_str_eq(ev.reference, "first");
	cr_assert_eq(ev.amount, 5);
	text = "{\"amount\": 6, \"reference\": \"caf\xc3\xa9\"}"; /* through jansson */
	cr_assert(ledger_event_from_text(LEDGER_FUNDS_DEPOSITED, text, strlen(text), &buf, &ev));
	cr_assert_str_eq(ev.reference, "caf\xc3\xa9");
	ledger_event_buf_free(&buf);
	cr_assert_null(buf.text);
}

/* Random object-like texts from pieces that are right, nearly right and wrong. */
Test(event_from_text, agrees_with_jansson_on_random_texts)
{
	static const char *const pieces[] = {
		"{",
		"}",
		",",
		":",
		" ",
		"\"amount\"",
		"\"reference\"",
		"\"transfer_id\"",
		"\"to\"",
		"\"from\"",
		"\"name\"",
		"\"currency\"",
		"\"account_id\"",
		"\"overdraft_limit\"",
		"\"x\"",
		"1",
		"-7",
		"0",
		"00",
		"12345678901234567890",
		"2.5",
		"\"EUR\"",
		"\"a\\\"b\"",
		"\"caf\xc3\xa9\"",
		"null",
		"[1]",
		"{\"k\": 1}",
		"\"",
		"\n",
	};
	const size_t n = sizeof(pieces) / sizeof(pieces[0]);
	unsigned seed = 20261126;
	char text[512];

	for (int round = 0; round < 20000; round++) {
		size_t len = 0;
		int count = 1 + rand_r(&seed) % 14;
		/* mostly well-formed: { "key": value, ... } with random slips */
		len += (size_t)snprintf(text + len, sizeof(text) - len, "%s",
					rand_r(&seed) % 16 ? "{" : pieces[rand_r(&seed) % n]);
		for (int i = 0; i < count && len < sizeof(text) - 64; i++) {
			const char *key = pieces[5 + rand_r(&seed) % 9],
				   *value = pieces[14 + rand_r(&seed) % 15];
			if (rand_r(&seed) % 10 == 0)
				key = pieces[rand_r(&seed) % n];
			len += (size_t)snprintf(text + len, sizeof(text) - len, "%s%s%s%s",
						i ? "," : "", key,
						rand_r(&seed) % 20 ? ": "
								   : pieces[rand_r(&seed) % n],
						value);
		}
		snprintf(text + len, sizeof(text) - len, "%s",
			 rand_r(&seed) % 16 ? "}" : pieces[rand_r(&seed) % n]);
		assert_text_like_json(text);
	}
}

/* Account state as snapshots store it */

static void assert_state_round_trips(const struct ledger_account *acc)
{
	json_t *j = ledger_account_to_json(acc);
	char *text = json_dumps(j, JSON_COMPACT);
	json_t *back = json_loads(text, 0, NULL);
	struct ledger_account out;
	char err[256] = "";

	cr_assert_not_null(back);
	memset(&out, 0x5a, sizeof(out));
	cr_assert(ledger_account_from_json(back, &out, err, sizeof(err)), "%s: %s", text, err);
	cr_assert_str_eq(out.id, acc->id);
	cr_assert_str_eq(out.currency, acc->currency);
	cr_assert_eq(out.balance, acc->balance);
	cr_assert_eq(out.overdraft_limit, acc->overdraft_limit);
	cr_assert_eq(out.version, acc->version);
	cr_assert_eq(out.closed, acc->closed);
	json_decref(j);
	json_decref(back);
	free(text);
}

Test(account_state, round_trips_through_its_json_text)
{
	struct ledger_account a = { .id = "acc-1",
				    .currency = "EUR",
				    .balance = 12345,
				    .overdraft_limit = 0,
				    .version = 1000 };
	struct ledger_account overdrawn = { .id = "x.y:z-9",
					    .currency = "JPY",
					    .balance = -500,
					    .overdraft_limit = 500,
					    .version = 1 };
	struct ledger_account big = { .currency = "USD",
				      .balance = INT64_MAX,
				      .overdraft_limit = INT64_MAX,
				      .version = INT32_MAX };
	struct ledger_account closed = {
		.id = "gone", .currency = "GBP", .version = 7, .closed = true
	};

	memset(big.id, 'b', LEDGER_ID_MAX);
	assert_state_round_trips(&a);
	assert_state_round_trips(&overdrawn);
	assert_state_round_trips(&big);
	assert_state_round_trips(&closed);
}

static void assert_state_refused(const char *text, const char *why)
{
	json_t *j = json_loads(text, 0, NULL);
	struct ledger_account out = { .id = "untouched", .version = 42 };
	char err[256] = "";

	cr_assert(!ledger_account_from_json(j, &out, err, sizeof(err)), "accepted %s", text);
	cr_assert(strstr(err, why), "%s: '%s' does not say '%s'", text, err, why);
	cr_assert_str_eq(out.id, "untouched");
	cr_assert_eq(out.version, 42);
	json_decref(j);
}

Test(account_state, implausible_or_malformed_state_is_refused)
{
	const char *good_rest =
		"\"currency\":\"EUR\",\"overdraft_limit\":0,\"version\":3,\"closed\":false";
	char text[256];

	assert_state_refused("[1]", "object");
	assert_state_refused("{\"account_id\":\"a\",\"currency\":\"EUR\",\"balance\":1,\"overdraft_limit\":0,"
			     "\"version\":3,\"closed\":false,\"extra\":1}",
			     "unknown field 'extra'");
	assert_state_refused("{\"currency\":\"EUR\",\"balance\":1,\"overdraft_limit\":0,\"version\":3,"
			     "\"closed\":false}",
			     "account_id");
	snprintf(text, sizeof(text), "{\"account_id\":\"bad id\",\"balance\":1,%s}", good_rest);
	assert_state_refused(text, "account_id");
	snprintf(text, sizeof(text), "{\"account_id\":\"a\",\"balance\":1.5,%s}", good_rest);
	assert_state_refused(text, "balance");
	snprintf(text, sizeof(text), "{\"account_id\":\"a\",\"balance\":\"1\",%s}", good_rest);
	assert_state_refused(text, "balance");
	assert_state_refused("{\"account_id\":\"a\",\"currency\":\"eur\",\"balance\":1,\"overdraft_limit\":0,"
			     "\"version\":3,\"closed\":false}",
			     "currency");
	assert_state_refused(
		"{\"account_id\":\"a\",\"currency\":\"EUR\",\"balance\":1,\"overdraft_limit\":-1,"
		"\"version\":3,\"closed\":false}",
		"overdraft_limit");
	assert_state_refused("{\"account_id\":\"a\",\"currency\":\"EUR\",\"balance\":1,\"overdraft_limit\":0,"
			     "\"version\":0,\"closed\":false}",
			     "version");
	assert_state_refused("{\"account_id\":\"a\",\"currency\":\"EUR\",\"balance\":1,\"overdraft_limit\":0,"
			     "\"version\":2147483648,\"closed\":false}",
			     "version");
	assert_state_refused("{\"account_id\":\"a\",\"currency\":\"EUR\",\"balance\":1,\"overdraft_limit\":0,"
			     "\"version\":3,\"closed\":0}",
			     "closed");
	assert_state_refused(
		"{\"account_id\":\"a\",\"currency\":\"EUR\",\"balance\":-11,\"overdraft_limit\":10,"
		"\"version\":3,\"closed\":false}",
		"below the overdraft limit");
	assert_state_refused("{\"account_id\":\"a\",\"currency\":\"EUR\",\"balance\":5,\"overdraft_limit\":0,"
			     "\"version\":3,\"closed\":true}",
			     "closed account");
}

Test(account_state, a_snapshot_is_used_only_for_its_own_account_at_its_own_version)
{
	const char *state = "{\"account_id\":\"acc-1\",\"currency\":\"EUR\",\"balance\":5,"
			    "\"overdraft_limit\":0,\"version\":1000,\"closed\":false}";
	struct ledger_account out = { .id = "untouched", .version = 42 };
	char err[256] = "";

	cr_assert(!ledger_snapshot_from_text(state, "acc-2", 1000, &out, err, sizeof(err)));
	cr_assert(strstr(err, "state of account 'acc-1'"), "%s", err);
	cr_assert(!ledger_snapshot_from_text(state, "acc-1", 999, &out, err, sizeof(err)));
	cr_assert(strstr(err, "at version 1000"), "%s", err);
	cr_assert(!ledger_snapshot_from_text("not json", "acc-1", 1000, &out, err, sizeof(err)));
	cr_assert_str_eq(out.id, "untouched");
	cr_assert_eq(out.version, 42);
	cr_assert(ledger_snapshot_from_text(state, "acc-1", 1000, &out, err, sizeof(err)), "%s",
		  err);
	cr_assert_str_eq(out.id, "acc-1");
	cr_assert_eq(out.balance, 5);
	cr_assert_eq(out.version, 1000);
}
