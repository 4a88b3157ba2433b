/* Fuzz harness for the JSON command-body parsers and the event-data decoders, and for
 * time travel's RFC 3339 times (readmodel_time_parse).
 *
 * As a libFuzzer target (clang; libFuzzer brings main, so without corpus_runner.c):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE \
 *     -Ishared -Itests/fuzz tests/fuzz/fuzz_commands.c shared/ledger.c shared/ledger_json.c \
 *     shared/readmodel.c \
 *     $(pkg-config --cflags --libs jansson) -o /tmp/fuzz_commands
 *   mkdir -p /tmp/fuzz-corpus && /tmp/fuzz_commands -max_len=4096 /tmp/fuzz-corpus tests/fuzz/corpus
 * The corpus regression under sanitizers, from meson:
 *   meson setup build-asan -Db_sanitize=address,undefined && meson test -C build-asan fuzz_corpus
 *
 * Linked with tests/fuzz/corpus_runner.c, main() runs every file (or every file in every
 * directory) named on the command line, and every prefix of each, through the same
 * checks: the meson test `fuzz_corpus` does so for tests/fuzz/corpus, as a regression
 * test. A broken invariant aborts.
 */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "ledger.h"
#include "ledger_json.h"
#include "readmodel.h"

/* A refusal always explains itself, within the buffer. */
static void check_refusal(const char *err, size_t errlen)
{
	size_t n = strnlen(err, errlen);

	CHECK(n > 0 && n < errlen);
}

static bool valid_optional_text(const char *s, size_t max)
{
	return !s || ledger_valid_text(s, max, true);
}

static void parse_open(json_t *body)
{
	struct ledger_open_body b;
	char err[256] = "";

	if (!ledger_parse_open(body, &b, err, sizeof(err))) {
		check_refusal(err, sizeof(err));
		return;
	}
	CHECK(ledger_valid_id(b.id));
	CHECK(b.name && ledger_valid_text(b.name, LEDGER_NAME_MAX, false));
	CHECK(ledger_valid_currency(b.currency));
	CHECK(ledger_valid_overdraft_limit(b.overdraft_limit));
}

static void parse_money(json_t *body)
{
	struct ledger_money_body b;
	char err[256] = "";

	if (!ledger_parse_money(body, &b, err, sizeof(err))) {
		check_refusal(err, sizeof(err));
		return;
	}
	CHECK(ledger_valid_amount(b.amount));
	CHECK(valid_optional_text(b.reference, LEDGER_REFERENCE_MAX));
}

static void parse_transfer(json_t *body)
{
	struct ledger_transfer_body b;
	char err[256] = "";

	if (!ledger_parse_transfer(body, &b, err, sizeof(err))) {
		check_refusal(err, sizeof(err));
		return;
	}
	CHECK(ledger_valid_id(b.id) && ledger_valid_id(b.from) && ledger_valid_id(b.to));
	CHECK(ledger_valid_amount(b.amount));
	CHECK(valid_optional_text(b.reference, LEDGER_REFERENCE_MAX));
}

static bool same_text(const char *a, const char *b)
{
	return a == b || (a && b && strcmp(a, b) == 0);
}

/* The text reader of transfers accepts only what jansson and ledger_parse_transfer
 * accept, with the same fields (it may leave any body to them). */
static void read_transfer_text(const uint8_t *data, size_t size, json_t *body)
{
	struct ledger_event_buf buf = { 0 };
	struct ledger_transfer_body fast, slow;
	char err[256] = "";

	if (ledger_transfer_from_text((const char *)data, size, &buf, &fast)) {
		CHECK(body && ledger_parse_transfer(body, &slow, err, sizeof(err)));
		CHECK(same_text(fast.id, slow.id) && same_text(fast.from, slow.from) &&
		      same_text(fast.to, slow.to) && same_text(fast.reference, slow.reference) &&
		      fast.amount == slow.amount);
	}
	ledger_event_buf_free(&buf);
}

static void parse_close(json_t *body)
{
	char err[256] = "";

	if (!ledger_parse_close(body, err, sizeof(err)))
		check_refusal(err, sizeof(err));
	else
		CHECK(json_is_object(body) && json_object_size(body) == 0);
}

/* Whatever decodes as an event must encode back to data that decodes the same. */
static void decode_event(enum ledger_event_type type, json_t *data)
{
	struct ledger_event ev, again;
	json_t *encoded;

	if (!ledger_event_from_json(type, data, &ev))
		return;
	CHECK(ev.type == type);
	encoded = ledger_event_to_json(&ev);
	CHECK(encoded);
	CHECK(ledger_event_from_json(type, encoded, &again));
	CHECK(again.type == ev.type && again.amount == ev.amount &&
	      again.overdraft_limit == ev.overdraft_limit);
	CHECK(same_text(again.account_id, ev.account_id) && same_text(again.name, ev.name) &&
	      same_text(again.currency, ev.currency) && same_text(again.reference, ev.reference) &&
	      same_text(again.transfer_id, ev.transfer_id) &&
	      same_text(again.counterparty, ev.counterparty));
	json_decref(encoded);
}

/* The input as a query parameter's text: a time that is accepted reads back, through
 * the read models' format, as the same instant. */
static void parse_time(const uint8_t *data, size_t size)
{
	char *text = malloc(size + 1), again[READMODEL_TIME_LEN];
	int64_t us, us2;

	CHECK(text);
	memcpy(text, data, size);
	text[size] = '\0';
	if (readmodel_time_parse(text, &us)) {
		readmodel_time_text(us, again);
		CHECK(readmodel_time_parse(again, &us2) && us2 == us);
	}
	free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const enum ledger_event_type types[] = {
		LEDGER_ACCOUNT_OPENED, LEDGER_FUNDS_DEPOSITED,   LEDGER_FUNDS_WITHDRAWN,
		LEDGER_TRANSFER_SENT,  LEDGER_TRANSFER_RECEIVED, LEDGER_ACCOUNT_CLOSED_EVENT,
	};
	json_t *body = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, NULL);
	char err[64] = "";

	parse_time(data, size);
	read_transfer_text(data, size, body);

	/* An empty body reaches the close parser as NULL, and closes. */
	if (size == 0)
		CHECK(ledger_parse_close(NULL, err, sizeof(err)));
	if (!body)
		return 0;
	parse_open(body);
	parse_money(body);
	parse_transfer(body);
	parse_close(body);
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
		decode_event(types[i], body);
	{
		struct ledger_event ev;
		CHECK(!ledger_event_from_json((enum ledger_event_type)0, body, &ev));
		CHECK(!ledger_event_from_json((enum ledger_event_type)99, body, &ev));
	}
	json_decref(body);
	return 0;
}
