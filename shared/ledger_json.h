/* JSON shapes of the ledger: command bodies in, event data out and back. Pure code. */
#ifndef DAYBOOK_LEDGER_JSON_H
#define DAYBOOK_LEDGER_JSON_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "ledger.h"

/* A parsed command body. Strings point into the json_t given to the parser and live
 * as long as it does (the caller keeps a reference). */
struct ledger_open_body {
	const char *id, *name, *currency;
	int64_t overdraft_limit; /* 0 when absent */
};
struct ledger_money_body { /* deposits and withdrawals */
	int64_t amount;
	const char *reference; /* NULL when absent */
};
struct ledger_transfer_body {
	const char *id, *from, *to;
	int64_t amount;
	const char *reference; /* NULL when absent */
};

/* Parsers for request bodies. `body` must be a JSON object already decoded by the
 * caller (not-an-object is reported here too). On a refusal they return false and
 * write into err (size errlen) a detail that names the field, e.g.
 * "field 'amount' must be an integer between 1 and 1000000000000000". Unknown
 * fields, missing required fields, wrong JSON types, ids/currency of the wrong shape,
 * amounts out of range and texts that are not valid UTF-8 or are too long are all
 * refused. `reference` may be the empty string; `name` may not. */
bool ledger_parse_open(json_t *body, struct ledger_open_body *out, char *err, size_t errlen)
	__attribute__((warn_unused_result));
bool ledger_parse_money(json_t *body, struct ledger_money_body *out, char *err, size_t errlen)
	__attribute__((warn_unused_result));
bool ledger_parse_transfer(json_t *body, struct ledger_transfer_body *out, char *err, size_t errlen)
	__attribute__((warn_unused_result));
/* Close has no fields: an empty object, or an empty body, which the caller passes as
 * NULL. Anything else is refused. */
bool ledger_parse_close(json_t *body, char *err, size_t errlen) __attribute__((warn_unused_result));

/* The event's data object as stored in the log (SPEC §2 names), e.g.
 * {"amount":100,"reference":"x"} for FundsDeposited; reference is omitted when NULL.
 * AccountOpened: {"account_id","name","currency","overdraft_limit"}; TransferSent:
 * {"transfer_id","to","amount","reference"?}; TransferReceived: {"transfer_id","from",
 * "amount","reference"?}; AccountClosed: {}. New reference: caller must json_decref. */
json_t *ledger_event_to_json(const struct ledger_event *ev);

/* A JSON text being built by hand (event data, an event's metadata), grown as
 * needed: reuse one for many texts (set len to 0) and free it with
 * ledger_text_free. A failure (out of memory, a string jansson would refuse) sets
 * `failed`, which stays set: the text is then unusable. */
struct ledger_text {
	char *p; /* not NUL-terminated: add the NUL with ledger_text_raw(t, "", 1) */
	size_t len, cap;
	bool failed;
};
void ledger_text_raw(struct ledger_text *t, const char *s, size_t n);
/* s as a JSON string, escaped as json_dumps escapes it; NULL fails. */
void ledger_text_string(struct ledger_text *t, const char *s);
void ledger_text_int(struct ledger_text *t, int64_t v);
void ledger_text_free(struct ledger_text *t);

/* ledger_event_to_json's object as compact JSON text, appended to t: the same bytes
 * as json_dumps(ledger_event_to_json(ev), JSON_COMPACT). False (t as it was, unless
 * `failed`) where ledger_event_to_json gives NULL, or when t failed. */
bool ledger_event_data_text(const struct ledger_event *ev, struct ledger_text *t)
	__attribute__((warn_unused_result));

/* Decode an event of the given type from its data object. Strings in *out borrow
 * from `data`. False when a field is missing or of the wrong type. */
bool ledger_event_from_json(enum ledger_event_type type, json_t *data, struct ledger_event *out)
	__attribute__((warn_unused_result));

/* An account's state as a snapshot stores it: {"account_id","currency","balance",
 * "overdraft_limit","version","closed"}. New reference: caller must json_decref. */
json_t *ledger_account_to_json(const struct ledger_account *acc);

/* The inverse, for state read back from storage, which is checked, never trusted:
 * every field present with its type, no other field, an id and currency of the right
 * shape, version >= 1, overdraft_limit >= 0, a balance not below -overdraft_limit and
 * 0 when closed. On a refusal returns false, leaves *out untouched and writes the
 * reason into err (size errlen). */
bool ledger_account_from_json(json_t *state, struct ledger_account *out, char *err, size_t errlen)
	__attribute__((warn_unused_result));

/* A stored snapshot's state (JSON text) decoded as ledger_account_from_json does, and
 * checked against what it was stored for: account `id` at `version`. False with the
 * reason in err when it cannot be used. */
bool ledger_snapshot_from_text(const char *state, const char *id, int32_t version,
			       struct ledger_account *out, char *err, size_t errlen)
	__attribute__((warn_unused_result));

/* The same decoding from the data's JSON text, several times faster for the usual
 * flat objects of plain strings and integers (anything else goes through jansson,
 * with the same result). Strings in *out live in buf until its next use; reuse one
 * buf for many events and free it with ledger_event_buf_free. */
struct ledger_event_buf {
	char *text;
	size_t cap;
	json_t *json;
};
bool ledger_event_from_text(enum ledger_event_type type, const char *text, size_t len,
			    struct ledger_event_buf *buf, struct ledger_event *out)
	__attribute__((warn_unused_result));
void ledger_event_buf_free(struct ledger_event_buf *buf);

/* A transfer's body read straight from its JSON text, for the usual plain body: a
 * flat object of the known fields, each once, strings of printable ASCII without
 * escapes, and every value valid. True only for a body ledger_parse_transfer would
 * accept with the same fields; false for anything else, valid or not (then parse it
 * with jansson and ledger_parse_transfer, which explain a refusal). Strings in *out
 * live in buf until its next use (ledger_event_buf_free). */
bool ledger_transfer_from_text(const char *text, size_t len, struct ledger_event_buf *buf,
			       struct ledger_transfer_body *out)
	__attribute__((warn_unused_result));

#endif
