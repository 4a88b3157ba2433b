/* JSON shapes of the ledger: checking command bodies and coding event data for the log. */
#include "ledger_json.h"
#include "log.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Always false, so that a refusal is one statement: return refuse(err, ...). */
__attribute__((format(printf, 3, 4))) static bool refuse(char *err, size_t errlen, const char *fmt,
							 ...)
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
	json_object_foreach (body, key, value) {
		for (i = 0; allowed[i] && strcmp(key, allowed[i]) != 0; i++)
			;
		/* The name is the client's own text: cap it so the detail stays short,
		 * between characters. */
		if (!allowed[i])
			return refuse(err, errlen, "unknown field '%.*s'",
				      (int)log_text_cut(key, strnlen(key, 64)), key);
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
static bool get_text(json_t *body, const char *field, bool required, size_t max, const char **out,
		     char *err, size_t errlen)
{
	json_t *v;

	if (!lookup(body, field, required, &v, err, errlen))
		return false;
	if (!v)
		return true;
	*out = string_of(v);
	if (!ledger_valid_text(*out, max, !required))
		return refuse(err, errlen,
			      "field '%s' must be a %sstring of at most %zu bytes of UTF-8 text",
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
	static const char *const fields[] = { "id", "name", "currency", "overdraft_limit", NULL };
	struct ledger_open_body b = { 0 };

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
	static const char *const fields[] = { "amount", "reference", NULL };
	struct ledger_money_body b = { 0 };

	if (!check_object(body, fields, err, errlen) ||
	    !get_integer(body, "amount", true, 1, LEDGER_AMOUNT_MAX, &b.amount, err, errlen) ||
	    !get_text(body, "reference", false, LEDGER_REFERENCE_MAX, &b.reference, err, errlen))
		return false;
	*out = b;
	return true;
}

bool ledger_parse_transfer(json_t *body, struct ledger_transfer_body *out, char *err, size_t errlen)
{
	static const char *const fields[] = { "id", "from", "to", "amount", "reference", NULL };
	struct ledger_transfer_body b = { 0 };

	if (!check_object(body, fields, err, errlen) || !get_id(body, "id", &b.id, err, errlen) ||
	    !get_id(body, "from", &b.from, err, errlen) ||
	    !get_id(body, "to", &b.to, err, errlen) ||
	    !get_integer(body, "amount", true, 1, LEDGER_AMOUNT_MAX, &b.amount, err, errlen) ||
	    !get_text(body, "reference", false, LEDGER_REFERENCE_MAX, &b.reference, err, errlen))
		return false;
	*out = b;
	return true;
}

bool ledger_parse_close(json_t *body, char *err, size_t errlen)
{
	static const char *const fields[] = { NULL };

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

/* Event data as text, built by hand: the same text json_dumps(ledger_event_to_json(ev),
 * JSON_COMPACT) gives, without the objects. */

static void text_reserve(struct ledger_text *t, size_t n)
{
	size_t cap = t->cap ? t->cap : 256;
	char *p;

	if (t->failed || t->len + n <= t->cap)
		return;
	while (cap < t->len + n)
		cap *= 2;
	if (!(p = realloc(t->p, cap))) {
		t->failed = true;
		return;
	}
	t->p = p;
	t->cap = cap;
}

void ledger_text_raw(struct ledger_text *t, const char *s, size_t n)
{
	text_reserve(t, n);
	if (t->failed)
		return;
	memcpy(t->p + t->len, s, n);
	t->len += n;
}

void ledger_text_string(struct ledger_text *t, const char *s)
{
	json_t *str;
	char *dumped;

	if (!s) {
		t->failed = true;
		return;
	}
	/* Text the domain accepts (UTF-8 without control characters): only the quote
	 * and the backslash need escaping. Anything else is jansson's to escape (and to
	 * refuse when it is not UTF-8), as before. */
	if (!ledger_valid_text(s, SIZE_MAX, true)) {
		str = json_string(s);
		dumped = str ? json_dumps(str, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
		if (dumped)
			ledger_text_raw(t, dumped, strlen(dumped));
		else
			t->failed = true;
		free(dumped);
		json_decref(str);
		return;
	}
	text_reserve(t, 2 * strlen(s) + 2);
	if (t->failed)
		return;
	t->p[t->len++] = '"';
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			t->p[t->len++] = '\\';
		t->p[t->len++] = *s;
	}
	t->p[t->len++] = '"';
}

void ledger_text_int(struct ledger_text *t, int64_t v)
{
	char digits[24];
	size_t n = 0;
	uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;

	do
		digits[sizeof(digits) - ++n] = (char)('0' + u % 10);
	while (u /= 10);
	if (v < 0)
		digits[sizeof(digits) - ++n] = '-';
	ledger_text_raw(t, digits + sizeof(digits) - n, n);
}

/* ,"key":"value" (the first member without its comma) */
static void member_string(struct ledger_text *t, const char *key, const char *value)
{
	ledger_text_raw(t, key, strlen(key));
	ledger_text_string(t, value);
}

static void member_int(struct ledger_text *t, const char *key, int64_t value)
{
	ledger_text_raw(t, key, strlen(key));
	ledger_text_int(t, value);
}

/* amount and reference, the amount's key given with what goes before it */
static void money_members(struct ledger_text *t, const char *amount_key,
			  const struct ledger_event *ev)
{
	member_int(t, amount_key, ev->amount);
	if (ev->reference)
		member_string(t, ",\"reference\":", ev->reference);
}

bool ledger_event_data_text(const struct ledger_event *ev, struct ledger_text *t)
{
	size_t mark = t->len;

	switch (ev ? ev->type : (enum ledger_event_type) - 1) {
	case LEDGER_ACCOUNT_OPENED:
		member_string(t, "{\"account_id\":", ev->account_id);
		member_string(t, ",\"name\":", ev->name);
		member_string(t, ",\"currency\":", ev->currency);
		member_int(t, ",\"overdraft_limit\":", ev->overdraft_limit);
		break;
	case LEDGER_FUNDS_DEPOSITED:
	case LEDGER_FUNDS_WITHDRAWN:
		money_members(t, "{\"amount\":", ev);
		break;
	case LEDGER_TRANSFER_SENT:
	case LEDGER_TRANSFER_RECEIVED:
		member_string(t, "{\"transfer_id\":", ev->transfer_id);
		member_string(t, ev->type == LEDGER_TRANSFER_SENT ? ",\"to\":" : ",\"from\":",
			      ev->counterparty);
		money_members(t, ",\"amount\":", ev);
		break;
	case LEDGER_ACCOUNT_CLOSED_EVENT:
		ledger_text_raw(t, "{", 1);
		break;
	default:
		return false;
	}
	ledger_text_raw(t, "}", 1);
	if (t->failed) {
		t->len = mark;
		return false;
	}
	return true;
}

void ledger_text_free(struct ledger_text *t)
{
	free(t->p);
	*t = (struct ledger_text){ 0 };
}

/* Decoding reads event data through a table of the members it knows, filled either
 * from a jansson object or straight from the JSON text (ledger_event_from_text), so
 * that both follow one set of rules. Decoding is lenient about extra keys, so that a
 * later version may add data to an event without making older readers refuse the
 * log. */
enum data_key {
	K_ACCOUNT_ID,
	K_NAME,
	K_CURRENCY,
	K_OVERDRAFT_LIMIT,
	K_AMOUNT,
	K_REFERENCE,
	K_TRANSFER_ID,
	K_TO,
	K_FROM,
	K_COUNT
};
static const char *const data_keys[K_COUNT] = {
	"account_id",  "name", "currency", "overdraft_limit", "amount", "reference",
	"transfer_id", "to",   "from",
};

enum member_kind { M_ABSENT, M_STRING, M_INTEGER, M_OTHER };
struct member {
	enum member_kind kind;
	const char *s;
	int64_t i;
};

static bool data_string(const struct member *m, enum data_key k, bool required, const char **out)
{
	if (m[k].kind == M_ABSENT)
		return !required;
	*out = m[k].s;
	return m[k].kind == M_STRING;
}

static bool data_integer(const struct member *m, enum data_key k, int64_t *out)
{
	*out = m[k].i;
	return m[k].kind == M_INTEGER;
}

static bool decode_opened(const struct member *m, struct ledger_event *ev)
{
	return data_string(m, K_ACCOUNT_ID, true, &ev->account_id) &&
	       data_string(m, K_NAME, true, &ev->name) &&
	       data_string(m, K_CURRENCY, true, &ev->currency) &&
	       data_integer(m, K_OVERDRAFT_LIMIT, &ev->overdraft_limit);
}

static bool decode_money(const struct member *m, struct ledger_event *ev)
{
	return data_integer(m, K_AMOUNT, &ev->amount) &&
	       data_string(m, K_REFERENCE, false, &ev->reference);
}

static bool decode_transfer(const struct member *m, enum data_key counterparty,
			    struct ledger_event *ev)
{
	return data_string(m, K_TRANSFER_ID, true, &ev->transfer_id) &&
	       data_string(m, counterparty, true, &ev->counterparty) && decode_money(m, ev);
}

static bool decode(const struct member *m, struct ledger_event *ev)
{
	switch (ev->type) {
	case LEDGER_ACCOUNT_OPENED:
		return decode_opened(m, ev);
	case LEDGER_FUNDS_DEPOSITED:
	case LEDGER_FUNDS_WITHDRAWN:
		return decode_money(m, ev);
	case LEDGER_TRANSFER_SENT:
		return decode_transfer(m, K_TO, ev);
	case LEDGER_TRANSFER_RECEIVED:
		return decode_transfer(m, K_FROM, ev);
	case LEDGER_ACCOUNT_CLOSED_EVENT:
		return true;
	default:
		return false;
	}
}

static void members_of_json(json_t *data, struct member *m)
{
	for (int k = 0; k < K_COUNT; k++) {
		json_t *v = json_object_get(data, data_keys[k]);
		m[k] = (struct member){ .kind = !v ? M_ABSENT : M_OTHER };
		if (json_is_string(v) && (m[k].s = string_of(v)))
			m[k].kind = M_STRING;
		else if (json_is_integer(v))
			m[k] = (struct member){ .kind = M_INTEGER, .i = json_integer_value(v) };
	}
}

/* --- the fast path: a flat object of plain strings and integers ------------------------
 * Anything else (an escape, a byte outside printable ASCII, a nested value, a
 * fraction, an integer out of range, odd syntax) is left to jansson, so this only
 * ever accepts what jansson would read the same way. */
struct scan {
	const char *p, *end;
	char *out; /* where string values are copied, NUL-terminated */
};

static void skip_space(struct scan *sc)
{
	while (sc->p < sc->end &&
	       (*sc->p == ' ' || *sc->p == '\n' || *sc->p == '\t' || *sc->p == '\r'))
		sc->p++;
}

static bool take(struct scan *sc, char c)
{
	skip_space(sc);
	if (sc->p < sc->end && *sc->p == c) {
		sc->p++;
		return true;
	}
	return false;
}

/* A string without escapes; *start and *len give its bytes. */
static bool plain_string(struct scan *sc, const char **start, size_t *len)
{
	if (!take(sc, '"'))
		return false;
	*start = sc->p;
	while (sc->p < sc->end && *sc->p != '"') {
		unsigned char c = (unsigned char)*sc->p;
		if (c < 0x20 || c >= 0x7f || c == '\\')
			return false;
		sc->p++;
	}
	if (sc->p == sc->end)
		return false;
	*len = (size_t)(sc->p++ - *start);
	return true;
}

/* -?(0|[1-9][0-9]*) within int64, not followed by a fraction or an exponent. */
static bool plain_integer(struct scan *sc, int64_t *out)
{
	bool neg = sc->p < sc->end && *sc->p == '-';
	uint64_t v = 0, limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
	const char *digits;

	sc->p += neg;
	digits = sc->p;
	while (sc->p < sc->end && *sc->p >= '0' && *sc->p <= '9') {
		unsigned d = (unsigned)(*sc->p++ - '0');
		if (v > (limit - d) / 10)
			return false;
		v = v * 10 + d;
	}
	if (sc->p == digits || (*digits == '0' && sc->p - digits > 1))
		return false;
	if (sc->p < sc->end && (*sc->p == '.' || *sc->p == 'e' || *sc->p == 'E'))
		return false;
	*out = neg ? (int64_t)(0 - v) : (int64_t)v;
	return true;
}

/* A flat object's members into m, by the index of their key in keys (nkeys of them).
 * Lenient (event data): other keys are skipped and a repeated key's last value
 * counts, as in jansson. Strict (a request body): another key or a repeated one is
 * left to jansson too (which refuses a repeat, and names an unknown field). */
static bool plain_members(struct scan *sc, const char *const *keys, int nkeys, bool strict,
			  struct member *m)
{
	if (!take(sc, '{'))
		return false;
	if (take(sc, '}'))
		goto end;
	do {
		const char *key, *value;
		size_t klen, vlen;
		struct member got;
		int k;

		if (!plain_string(sc, &key, &klen) || !take(sc, ':'))
			return false;
		skip_space(sc);
		if (sc->p < sc->end && *sc->p == '"') {
			if (!plain_string(sc, &value, &vlen))
				return false;
			memcpy(sc->out, value, vlen);
			sc->out[vlen] = '\0';
			got = (struct member){ .kind = M_STRING, .s = sc->out };
			sc->out += vlen + 1;
		} else {
			got = (struct member){ .kind = M_INTEGER };
			if (!plain_integer(sc, &got.i))
				return false;
		}
		for (k = 0; k < nkeys; k++)
			if (strlen(keys[k]) == klen && memcmp(keys[k], key, klen) == 0)
				break;
		if (strict && (k == nkeys || m[k].kind != M_ABSENT))
			return false;
		if (k < nkeys)
			m[k] = got; /* a repeated key: the last one counts, as in jansson */
	} while (take(sc, ','));
	if (!take(sc, '}'))
		return false;
end:
	skip_space(sc);
	return sc->p == sc->end;
}

/* Room in buf for the strings of a text of len bytes (each no longer than the text). */
static bool buf_room(struct ledger_event_buf *buf, size_t len)
{
	char *p;

	json_decref(buf->json);
	buf->json = NULL;
	if (buf->cap >= len + 1)
		return true;
	if (!(p = realloc(buf->text, len + 1)))
		return false;
	buf->text = p;
	buf->cap = len + 1;
	return true;
}

bool ledger_transfer_from_text(const char *text, size_t len, struct ledger_event_buf *buf,
			       struct ledger_transfer_body *out)
{
	enum { T_ID, T_FROM, T_TO, T_AMOUNT, T_REFERENCE, T_COUNT };
	static const char *const keys[T_COUNT] = { "id", "from", "to", "amount", "reference" };
	struct member m[T_COUNT] = { 0 };
	struct scan sc = { text, text + len, NULL };

	if (!buf_room(buf, len))
		return false;
	sc.out = buf->text;
	if (!plain_members(&sc, keys, T_COUNT, true, m))
		return false;
	/* Only a body ledger_parse_transfer accepts: any refusal is its to explain. */
	for (int k = T_ID; k <= T_TO; k++)
		if (m[k].kind != M_STRING || !ledger_valid_id(m[k].s))
			return false;
	if (m[T_AMOUNT].kind != M_INTEGER || m[T_AMOUNT].i < 1 || m[T_AMOUNT].i > LEDGER_AMOUNT_MAX)
		return false;
	if (m[T_REFERENCE].kind != M_ABSENT &&
	    (m[T_REFERENCE].kind != M_STRING ||
	     !ledger_valid_text(m[T_REFERENCE].s, LEDGER_REFERENCE_MAX, true)))
		return false;
	*out = (struct ledger_transfer_body){ .id = m[T_ID].s,
					      .from = m[T_FROM].s,
					      .to = m[T_TO].s,
					      .amount = m[T_AMOUNT].i,
					      .reference = m[T_REFERENCE].s };
	return true;
}

bool ledger_event_from_text(enum ledger_event_type type, const char *text, size_t len,
			    struct ledger_event_buf *buf, struct ledger_event *out)
{
	struct member m[K_COUNT] = { 0 };
	struct ledger_event ev = { .type = type };
	struct scan sc = { text, text + len, NULL };

	if (!buf_room(buf, len))
		return false;
	sc.out = buf->text;
	if (!plain_members(&sc, data_keys, K_COUNT, false, m)) {
		buf->json = json_loadb(text, len, 0, NULL);
		if (!json_is_object(buf->json))
			return false;
		members_of_json(buf->json, m);
	}
	if (!decode(m, &ev))
		return false;
	*out = ev;
	return true;
}

void ledger_event_buf_free(struct ledger_event_buf *buf)
{
	json_decref(buf->json);
	free(buf->text);
	*buf = (struct ledger_event_buf){ 0 };
}

bool ledger_event_from_json(enum ledger_event_type type, json_t *data, struct ledger_event *out)
{
	struct ledger_event ev = { .type = type };
	struct member m[K_COUNT];

	if (!json_is_object(data))
		return false;
	members_of_json(data, m);
	if (!decode(m, &ev))
		return false;
	*out = ev;
	return true;
}

/* Account state, as snapshots store it */

json_t *ledger_account_to_json(const struct ledger_account *acc)
{
	if (!acc)
		return NULL;
	return json_pack("{s:s, s:s, s:I, s:I, s:I, s:b}", "account_id", acc->id, "currency",
			 acc->currency, "balance", (json_int_t)acc->balance, "overdraft_limit",
			 (json_int_t)acc->overdraft_limit, "version", (json_int_t)acc->version,
			 "closed", acc->closed);
}

bool ledger_account_from_json(json_t *state, struct ledger_account *out, char *err, size_t errlen)
{
	static const char *const fields[] = {
		"account_id", "currency", "balance", "overdraft_limit", "version", "closed", NULL
	};
	struct ledger_account acc = { .version = 0 };
	const char *id = NULL, *currency = NULL;
	int64_t version = 0;
	json_t *closed;

	if (!check_object(state, fields, err, errlen) ||
	    !get_id(state, "account_id", &id, err, errlen) ||
	    !get_currency(state, "currency", &currency, err, errlen) ||
	    !get_integer(state, "overdraft_limit", true, 0, INT64_MAX, &acc.overdraft_limit, err,
			 errlen) ||
	    !get_integer(state, "balance", true, INT64_MIN, INT64_MAX, &acc.balance, err, errlen) ||
	    !get_integer(state, "version", true, 1, INT32_MAX, &version, err, errlen) ||
	    !lookup(state, "closed", true, &closed, err, errlen))
		return false;
	if (!json_is_boolean(closed))
		return refuse(err, errlen, "field 'closed' must be a boolean");
	if (acc.balance < -acc.overdraft_limit)
		return refuse(err, errlen,
			      "balance %" PRId64 " is below the overdraft limit %" PRId64,
			      acc.balance, acc.overdraft_limit);
	if (json_is_true(closed) && acc.balance != 0)
		return refuse(err, errlen, "a closed account has balance %" PRId64, acc.balance);
	snprintf(acc.id, sizeof(acc.id), "%s", id);
	snprintf(acc.currency, sizeof(acc.currency), "%s", currency);
	acc.version = (int32_t)version;
	acc.closed = json_is_true(closed);
	*out = acc;
	return true;
}

bool ledger_snapshot_from_text(const char *state, const char *id, int32_t version,
			       struct ledger_account *out, char *err, size_t errlen)
{
	json_t *json = json_loads(state, 0, NULL);
	struct ledger_account snap;
	bool ok = false;

	if (!ledger_account_from_json(json, &snap, err, errlen))
		goto done;
	if (strcmp(snap.id, id) != 0) {
		snprintf(err, errlen, "it is the state of account '%s'", snap.id);
		goto done;
	}
	if (snap.version != version) {
		snprintf(err, errlen, "its state is at version %" PRId32, snap.version);
		goto done;
	}
	*out = snap;
	ok = true;
done:
	json_decref(json);
	return ok;
}
