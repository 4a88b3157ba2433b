/* JSON shapes of the ledger: checking command bodies and coding event data for the log. */
#include "ledger_json.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Always false, so that a refusal is one statement: return refuse(err, ...). */
__attribute__((format(printf, 3, 4)))
static bool refuse(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen > 0) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return false;
}

/* The C string of a JSON string, or NULL when v is not a string or holds a NUL
 * (which C code would silently cut short). Borrowed from v. */
static const char *string_of(const json_t *v)
{
	const char *s = json_string_value(v);

	if (!s || strlen(s) != json_string_length(v))
		return NULL;
	return s;
}

static bool check_object(json_t *body, const char *const *allowed, char *err, size_t errlen)
{
	const char *key;
	json_t *value;
	size_t i;

	if (!json_is_object(body))
		return refuse(err, errlen, "body must be a JSON object");
	json_object_foreach(body, key, value) {
		for (i = 0; allowed[i] && strcmp(key, allowed[i]) != 0; i++)
			;
		/* The name is the client's own text: cap it so the detail stays short. */
		if (!allowed[i])
			return refuse(err, errlen, "unknown field '%.64s'", key);
	}
	return true;
}

/* A missing required field is refused; a missing optional one leaves *v NULL. */
static bool lookup(json_t *body, const char *field, bool required, json_t **v, char *err,
		   size_t errlen)
{
	*v = json_object_get(body, field);
	if (!*v && required)
		return refuse(err, errlen, "field '%s' is required", field);
	return true;
}

static bool get_id(json_t *body, const char *field, const char **out, char *err, size_t errlen)
{
	json_t *v;

	if (!lookup(body, field, true, &v, err, errlen))
		return false;
	*out = string_of(v);
	if (!ledger_valid_id(*out))
		return refuse(err, errlen, "field '%s' must be 1-%d characters of [A-Za-z0-9._:-]",
			      field, LEDGER_ID_MAX);
	return true;
}

static bool get_currency(json_t *body, const char *field, const char **out, char *err,
			 size_t errlen)
{
	json_t *v;

	if (!lookup(body, field, true, &v, err, errlen))
		return false;
	*out = string_of(v);
	if (!ledger_valid_currency(*out))
		return refuse(err, errlen, "field '%s' must be three upper-case letters", field);
	return true;
}

/* A required text must be non-empty; an optional one may be empty. *out stays NULL
 * when an optional text is absent. */
static bool get_text(json_t *body, const char *field, bool required, size_t max,
		     const char **out, char *err, size_t errlen)
{
	json_t *v;

	if (!lookup(body, field, required, &v, err, errlen))
		return false;
	if (!v)
		return true;
	*out = string_of(v);
	if (!ledger_valid_text(*out, max, !required))
		return refuse(err, errlen, "field '%s' must be a %sstring of at most %zu bytes of UTF-8 text",
			      field, required ? "non-empty " : "", max);
	return true;
}

/* Only a JSON integer will do: a real such as 1.0 is refused, money is never floating
 * point. *out keeps its value when an optional integer is absent. */
static bool get_integer(json_t *body, const char *field, bool required, int64_t min, int64_t max,
			int64_t *out, char *err, size_t errlen)
{
	json_t *v;
	json_int_t n;

	if (!lookup(body, field, required, &v, err, errlen))
		return false;
	if (!v)
		return true;
	n = json_integer_value(v);
	if (!json_is_integer(v) || n < min || n > max)
		return refuse(err, errlen,
			      "field '%s' must be an integer between %" PRId64 " and %" PRId64,
			      field, min, max);
	*out = n;
	return true;
}

bool ledger_parse_open(json_t *body, struct ledger_open_body *out, char *err, size_t errlen)
{
	static const char *const fields[] = {"id", "name", "currency", "overdraft_limit", NULL};
	struct ledger_open_body b = {0};

	if (!check_object(body, fields, err, errlen) || !get_id(body, "id", &b.id, err, errlen) ||
	    !get_text(body, "name", true, LEDGER_NAME_MAX, &b.name, err, errlen) ||
	    !get_currency(body, "currency", &b.currency, err, errlen) ||
	    !get_integer(body, "overdraft_limit", false, 0, INT64_MAX, &b.overdraft_limit, err,
			 errlen))
		return false;
	*out = b;
	return true;
}

bool ledger_parse_money(json_t *body, struct ledger_money_body *out, char *err, size_t errlen)
{
	static const char *const fields[] = {"amount", "reference", NULL};
	struct ledger_money_body b = {0};

	if (!check_object(body, fields, err, errlen) ||
	    !get_integer(body, "amount", true, 1, LEDGER_AMOUNT_MAX, &b.amount, err, errlen) ||
	    !get_text(body, "reference", false, LEDGER_REFERENCE_MAX, &b.reference, err, errlen))
		return false;
	*out = b;
	return true;
}

bool ledger_parse_transfer(json_t *body, struct ledger_transfer_body *out, char *err,
			   size_t errlen)
{
	static const char *const fields[] = {"id", "from", "to", "amount", "reference", NULL};
	struct ledger_transfer_body b = {0};

	if (!check_object(body, fields, err, errlen) || !get_id(body, "id", &b.id, err, errlen) ||
	    !get_id(body, "from", &b.from, err, errlen) || !get_id(body, "to", &b.to, err, errlen) ||
	    !get_integer(body, "amount", true, 1, LEDGER_AMOUNT_MAX, &b.amount, err, errlen) ||
	    !get_text(body, "reference", false, LEDGER_REFERENCE_MAX, &b.reference, err, errlen))
		return false;
	*out = b;
	return true;
}

bool ledger_parse_close(json_t *body, char *err, size_t errlen)
{
	static const char *const fields[] = {NULL};

	return !body || check_object(body, fields, err, errlen);
}

/* Event data */

/* "s*" leaves the reference out when it is NULL; json_pack fails (NULL) on a NULL
 * required string or on text that is not UTF-8. */
json_t *ledger_event_to_json(const struct ledger_event *ev)
{
	json_int_t amount;

	if (!ev)
		return NULL;
	amount = ev->amount;
	switch (ev->type) {
	case LEDGER_ACCOUNT_OPENED:
		return json_pack("{s:s, s:s, s:s, s:I}", "account_id", ev->account_id, "name",
				 ev->name, "currency", ev->currency, "overdraft_limit",
				 (json_int_t)ev->overdraft_limit);
	case LEDGER_FUNDS_DEPOSITED:
	case LEDGER_FUNDS_WITHDRAWN:
		return json_pack("{s:I, s:s*}", "amount", amount, "reference", ev->reference);
	case LEDGER_TRANSFER_SENT:
		return json_pack("{s:s, s:s, s:I, s:s*}", "transfer_id", ev->transfer_id, "to",
				 ev->counterparty, "amount", amount, "reference", ev->reference);
	case LEDGER_TRANSFER_RECEIVED:
		return json_pack("{s:s, s:s, s:I, s:s*}", "transfer_id", ev->transfer_id, "from",
				 ev->counterparty, "amount", amount, "reference", ev->reference);
	case LEDGER_ACCOUNT_CLOSED_EVENT:
		return json_object();
	default:
		return NULL;
	}
}

/* Decoding is lenient about extra keys, so that a later version may add data to an
 * event without making older readers refuse the log. */
static bool data_string(json_t *data, const char *key, bool required, const char **out)
{
	json_t *v = json_object_get(data, key);

	if (!v)
		return !required;
	*out = string_of(v);
	return *out != NULL;
}

static bool data_integer(json_t *data, const char *key, int64_t *out)
{
	json_t *v = json_object_get(data, key);

	if (!json_is_integer(v))
		return false;
	*out = json_integer_value(v);
	return true;
}

static bool decode_opened(json_t *data, struct ledger_event *ev)
{
	return data_string(data, "account_id", true, &ev->account_id) &&
	       data_string(data, "name", true, &ev->name) &&
	       data_string(data, "currency", true, &ev->currency) &&
	       data_integer(data, "overdraft_limit", &ev->overdraft_limit);
}

static bool decode_money(json_t *data, struct ledger_event *ev)
{
	return data_integer(data, "amount", &ev->amount) &&
	       data_string(data, "reference", false, &ev->reference);
}

static bool decode_transfer(json_t *data, const char *counterparty_key, struct ledger_event *ev)
{
	return data_string(data, "transfer_id", true, &ev->transfer_id) &&
	       data_string(data, counterparty_key, true, &ev->counterparty) && decode_money(data, ev);
}

static bool decode(json_t *data, struct ledger_event *ev)
{
	switch (ev->type) {
	case LEDGER_ACCOUNT_OPENED:
		return decode_opened(data, ev);
	case LEDGER_FUNDS_DEPOSITED:
	case LEDGER_FUNDS_WITHDRAWN:
		return decode_money(data, ev);
	case LEDGER_TRANSFER_SENT:
		return decode_transfer(data, "to", ev);
	case LEDGER_TRANSFER_RECEIVED:
		return decode_transfer(data, "from", ev);
	case LEDGER_ACCOUNT_CLOSED_EVENT:
		return true;
	default:
		return false;
	}
}

bool ledger_event_from_json(enum ledger_event_type type, json_t *data, struct ledger_event *out)
{
	struct ledger_event ev = {.type = type};

	if (!json_is_object(data) || !decode(data, &ev))
		return false;
	*out = ev;
	return true;
}
