/* The read models' JSON bodies and position tokens, shared by projector and query. */
#include "readmodel.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* The bodies are written directly rather than built as jansson values and dumped:
 * they are made for every event the projector applies and every item a rebuild
 * sends, and this is several times faster. The text is byte-identical to
 * json_dumps(JSON_COMPACT) of the same object (tests/unit/test_shared.c checks). */
struct out {
	char *p;
	size_t len, cap;
	size_t start; /* where the object being written starts */
	bool failed;  /* out of memory, or a string that is not UTF-8 */
};

static bool room(struct out *o, size_t more)
{
	if (o->failed)
		return false;
	if (o->len + more + 1 > o->cap) {
		size_t cap = o->cap ? o->cap * 2 : 256;
		while (cap < o->len + more + 1)
			cap *= 2;
		char *p = realloc(o->p, cap);
		if (!p) {
			o->failed = true;
			return false;
		}
		o->p = p;
		o->cap = cap;
	}
	return true;
}

static void raw(struct out *o, const char *s, size_t n)
{
	if (room(o, n)) {
		memcpy(o->p + o->len, s, n);
		o->len += n;
	}
}

/* Length of the UTF-8 sequence at s (its first byte >= 0x80), 0 when invalid: the
 * same rule as jansson, which refuses such strings. */
static size_t utf8_len(const unsigned char *s)
{
	unsigned c = s[0], n, cp;

	if (c >= 0xc2 && c <= 0xdf)
		n = 2, cp = c & 0x1f;
	else if (c >= 0xe0 && c <= 0xef)
		n = 3, cp = c & 0x0f;
	else if (c >= 0xf0 && c <= 0xf4)
		n = 4, cp = c & 0x07;
	else
		return 0;
	for (unsigned i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10ffff ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

/* A JSON string: escapes as jansson writes them. */
static void str(struct out *o, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	const unsigned char *u = (const unsigned char *)s;
	size_t i = 0, start = 0;

	raw(o, "\"", 1);
	while (!o->failed && u[i]) {
		unsigned char c = u[i];
		char esc[7] = "\\u00";
		size_t n = 2;

		/* The common case, a run of plain ASCII, in a tight loop. */
		while (u[i] >= 0x20 && u[i] < 0x80 && u[i] != '"' && u[i] != '\\')
			i++;
		if (!(c = u[i]))
			break;
		if (c >= 0x80) {
			size_t len = utf8_len(u + i);
			if (!len)
				o->failed = true;
			i += len;
			continue;
		}
		raw(o, s + start, i - start);
		switch (c) {
		case '"':
			esc[1] = '"';
			break;
		case '\\':
			esc[1] = '\\';
			break;
		case '\b':
			esc[1] = 'b';
			break;
		case '\f':
			esc[1] = 'f';
			break;
		case '\n':
			esc[1] = 'n';
			break;
		case '\r':
			esc[1] = 'r';
			break;
		case '\t':
			esc[1] = 't';
			break;
		default:
			esc[4] = hex[c >> 4];
			esc[5] = hex[c & 15];
			n = 6;
		}
		raw(o, esc, n);
		start = ++i;
	}
	raw(o, s + start, i - start);
	raw(o, "\"", 1);
}

static void integer(struct out *o, int64_t v)
{
	char text[48];

	readmodel_int128_text(v, text);
	raw(o, text, strlen(text));
}

/* ,"key": then the value; the first member opens the object. */
static void key(struct out *o, const char *k)
{
	size_t n = strlen(k);
	char open = o->len > o->start ? ',' : '{';

	/* Keys are this file's constants, plain ASCII: nothing to escape. */
	if (room(o, n + 4)) {
		o->p[o->len++] = open;
		o->p[o->len++] = '"';
		memcpy(o->p + o->len, k, n);
		o->len += n;
		o->p[o->len++] = '"';
		o->p[o->len++] = ':';
	}
}

static void member_str(struct out *o, const char *k, const char *v)
{
	key(o, k);
	if (v)
		str(o, v);
	else
		raw(o, "null", 4);
}

static void member_int(struct out *o, const char *k, int64_t v)
{
	key(o, k);
	integer(o, v);
}

/* Close the object and hand its text over; NULL when anything failed. */
static char *done(struct out *o)
{
	raw(o, "}", 1);
	if (o->failed) {
		free(o->p);
		return NULL;
	}
	o->p[o->len] = '\0';
	return o->p;
}

static void account_members(struct out *o, const struct readmodel_account *a)
{
	member_str(o, "account_id", a->account_id);
	member_str(o, "name", a->name);
	member_str(o, "currency", a->currency);
	member_int(o, "balance", a->balance);
	member_int(o, "overdraft_limit", a->overdraft_limit);
	member_str(o, "status", a->status);
	member_int(o, "version", a->version);
	member_str(o, "opened_at", a->opened_at);
	member_str(o, "updated_at", a->updated_at);
}

static void entry_members(struct out *o, const struct readmodel_entry *e)
{
	member_int(o, "version", e->version);
	member_str(o, "type", e->type);
	member_int(o, "amount", e->amount);
	member_int(o, "balance_after", e->balance_after);
	if (e->transfer_id)
		member_str(o, "transfer_id", e->transfer_id);
	if (e->counterparty)
		member_str(o, "counterparty", e->counterparty);
	if (e->reference)
		member_str(o, "reference", e->reference);
	member_str(o, "at", e->at);
}

static void transfer_members(struct out *o, const struct readmodel_transfer *t)
{
	member_str(o, "transfer_id", t->transfer_id);
	member_str(o, "from", t->from);
	member_str(o, "to", t->to);
	member_int(o, "amount", t->amount);
	member_str(o, "currency", t->currency);
	member_str(o, "reference", t->reference); /* null when absent */
	member_str(o, "at", t->at);
}

/* The object's text and its NUL at the end of b; where it starts, or (size_t)-1 (b
 * as it was, its memory perhaps grown) when out of memory or a string is not UTF-8. */
static size_t append_done(struct readmodel_text *b, struct out *o)
{
	raw(o, "}", 1);
	if (room(o, 0))
		o->p[o->len] = '\0';
	b->p = o->p;
	b->cap = o->cap;
	if (o->failed)
		return (size_t)-1;
	b->len = o->len + 1;
	return o->start;
}

#define APPEND_OPEN(b)                                                                             \
	{                                                                                          \
		.p = (b)->p, .len = (b)->len, .cap = (b)->cap, .start = (b)->len                   \
	}

size_t readmodel_account_json_append(struct readmodel_text *b, const struct readmodel_account *a)
{
	struct out o = APPEND_OPEN(b);

	account_members(&o, a);
	return append_done(b, &o);
}

size_t readmodel_entry_json_append(struct readmodel_text *b, const struct readmodel_entry *e)
{
	struct out o = APPEND_OPEN(b);

	entry_members(&o, e);
	return append_done(b, &o);
}

size_t readmodel_transfer_json_append(struct readmodel_text *b, const struct readmodel_transfer *t)
{
	struct out o = APPEND_OPEN(b);

	transfer_members(&o, t);
	return append_done(b, &o);
}

/* A body alone: appended to a buffer of its own, which it then is. */
static char *alone(struct readmodel_text *b, size_t at)
{
	if (at == (size_t)-1) {
		readmodel_text_free(b);
		return NULL;
	}
	return b->p;
}

char *readmodel_account_json(const struct readmodel_account *a)
{
	struct readmodel_text b = { 0 };

	return alone(&b, readmodel_account_json_append(&b, a));
}

char *readmodel_entry_json(const struct readmodel_entry *e)
{
	struct readmodel_text b = { 0 };

	return alone(&b, readmodel_entry_json_append(&b, e));
}

char *readmodel_transfer_json(const struct readmodel_transfer *t)
{
	struct readmodel_text b = { 0 };

	return alone(&b, readmodel_transfer_json_append(&b, t));
}

void readmodel_text_free(struct readmodel_text *b)
{
	free(b->p);
	*b = (struct readmodel_text){ 0 };
}

long long readmodel_item_version(const char *json)
{
	static const char prefix[] = "{\"version\":";
	long long v = 0;
	const char *p;

	if (!json || strncmp(json, prefix, sizeof(prefix) - 1) != 0)
		return -1;
	p = json + sizeof(prefix) - 1;
	if (*p < '0' || *p > '9')
		return -1;
	for (; *p >= '0' && *p <= '9' && v < 1000000000000LL; p++)
		v = 10 * v + (*p - '0');
	return *p == ',' ? v : -1;
}

/* An optional minus sign and at least one digit, nothing else. */
static bool integer_text(const char *s)
{
	if (*s == '-')
		s++;
	if (!*s)
		return false;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return false;
	return true;
}

/* The members are spliced as text (jansson has no integers beyond int64); the buffer
 * grows with the rows, whatever their number and the numbers' lengths. */
char *readmodel_totals_json(const struct readmodel_total *rows, size_t n)
{
	static const char *const names[] = { "\"currency\":", ",\"accounts\":",
					     ",\"open_accounts\":", ",\"balance_sum\":" };
	struct out o = { 0 };

	raw(&o, "{\"currencies\":[", 15);
	for (size_t i = 0; i < n && !o.failed; i++) {
		const char *v[4] = { rows[i].currency, rows[i].accounts, rows[i].open_accounts,
				     rows[i].balance_sum };
		if (!v[0] || !ledger_valid_currency(v[0]))
			o.failed = true;
		raw(&o, i ? ",{" : "{", i ? 2 : 1);
		for (size_t k = 0; k < 4 && !o.failed; k++) {
			raw(&o, names[k], strlen(names[k]));
			if (k == 0) {
				str(&o, v[0]);
			} else if (v[k] && integer_text(v[k])) {
				raw(&o, v[k], strlen(v[k]));
			} else {
				o.failed = true;
			}
		}
		raw(&o, "}", 1);
	}
	raw(&o, "]", 1);
	return done(&o);
}

/* Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm). */
static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
	z += 719468;
	int64_t era = (z >= 0 ? z : z - 146096) / 146097;
	unsigned doe = (unsigned)(z - era * 146097);
	unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	unsigned mp = (5 * doy + 2) / 153;

	*d = doy - (153 * mp + 2) / 5 + 1;
	*m = mp < 10 ? mp + 3 : mp - 9;
	*y = (int64_t)yoe + era * 400 + (*m <= 2);
}

static void digits(char *out, uint64_t v, int n)
{
	while (n--) {
		out[n] = (char)('0' + v % 10);
		v /= 10;
	}
}

void readmodel_time_text(int64_t pg_micros, char out[READMODEL_TIME_LEN])
{
	const int64_t day = 86400000000LL, unix_days = 10957; /* 1970-01-01 to 2000-01-01 */
	int64_t days = pg_micros / day, rem = pg_micros % day, year;
	unsigned month, mday;

	if (rem < 0) {
		rem += day;
		days--;
	}
	civil_from_days(days + unix_days, &year, &month, &mday);
	digits(out, (uint64_t)(year < 0 ? 0 : year), 4);
	out[4] = '-';
	digits(out + 5, month, 2);
	out[7] = '-';
	digits(out + 8, mday, 2);
	out[10] = 'T';
	digits(out + 11, (uint64_t)(rem / 3600000000LL), 2);
	out[13] = ':';
	digits(out + 14, (uint64_t)(rem / 60000000 % 60), 2);
	out[16] = ':';
	digits(out + 17, (uint64_t)(rem / 1000000 % 60), 2);
	out[19] = '.';
	digits(out + 20, (uint64_t)(rem % 1000000), 6);
	out[26] = 'Z';
	out[27] = '\0';
}

/* The inverse of civil_from_days: days since 1970-01-01 of a proleptic Gregorian date. */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
	int64_t era, yoe, doy, doe;

	y -= m <= 2;
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = y - era * 400;
	doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + doe - 719468;
}

/* n decimal digits at s; false when one is not a digit. */
static bool fixed_digits(const char *s, int n, unsigned *out)
{
	unsigned v = 0;

	for (int i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (unsigned)(s[i] - '0');
	}
	*out = v;
	return true;
}

/* The offset at s ("Z", "z", "+hh:mm", "-hh:mm", or " hh:mm" for an unencoded '+'),
 * which must end the text, in seconds east of UTC; false when malformed. */
static bool parse_offset(const char *s, int64_t *out)
{
	unsigned h, m;

	if ((s[0] == 'Z' || s[0] == 'z') && s[1] == '\0') {
		*out = 0;
		return true;
	}
	if (!s[0] || !strchr("+- ", s[0]) || strlen(s) != 6 || !fixed_digits(s + 1, 2, &h) ||
	    s[3] != ':' || !fixed_digits(s + 4, 2, &m) || h > 23 || m > 59)
		return false;
	*out = (s[0] == '-' ? -1 : 1) * (int64_t)(h * 3600 + m * 60);
	return true;
}

bool readmodel_time_parse(const char *text, int64_t *pg_micros)
{
	static const unsigned mdays[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
	/* Days since 1970-01-01 of 2000-01-01, 0001-01-01 and 9999-12-31. */
	const int64_t unix_days = 10957, min_days = -719162, max_days = 2932896;
	unsigned y, mo, d, h, mi, sec;
	int64_t micros = 0, offset, t;
	size_t i = 19;
	int nfrac = 0;

	if (strlen(text) < 20 || !fixed_digits(text, 4, &y) || text[4] != '-' ||
	    !fixed_digits(text + 5, 2, &mo) || text[7] != '-' || !fixed_digits(text + 8, 2, &d) ||
	    !strchr("Tt ", text[10]) || !fixed_digits(text + 11, 2, &h) || text[13] != ':' ||
	    !fixed_digits(text + 14, 2, &mi) || text[16] != ':' ||
	    !fixed_digits(text + 17, 2, &sec))
		return false;
	if (y < 1 || mo < 1 || mo > 12 || d < 1 ||
	    d > mdays[mo - 1] + (mo == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0)) ||
	    h > 23 || mi > 59 || sec > 59)
		return false;
	if (text[i] == '.') {
		for (i++; text[i] >= '0' && text[i] <= '9'; i++, nfrac++)
			if (nfrac < 6)
				micros = micros * 10 + (text[i] - '0');
		if (nfrac == 0)
			return false;
		for (int k = nfrac; k < 6; k++)
			micros *= 10;
	}
	if (!parse_offset(text + i, &offset))
		return false;
	t = (days_from_civil(y, mo, d) - unix_days) * 86400 + h * 3600 + mi * 60 + sec - offset;
	if (t < (min_days - unix_days) * 86400 || t >= (max_days - unix_days + 1) * 86400)
		return false;
	*pg_micros = t * 1000000 + micros;
	return true;
}

static bool parse_u64(const char *s, size_t n, uint64_t *out)
{
	uint64_t v = 0;

	if (n == 0 || n > 19)
		return false;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	*out = v;
	return true;
}

bool readmodel_position_parse(const char *text, struct readmodel_position *out)
{
	const char *dot = text ? strchr(text, '.') : NULL;

	return dot && parse_u64(text, (size_t)(dot - text), &out->txid) &&
	       parse_u64(dot + 1, strlen(dot + 1), &out->position);
}

int readmodel_position_cmp(const struct readmodel_position *a, const struct readmodel_position *b)
{
	if (a->txid != b->txid)
		return a->txid < b->txid ? -1 : 1;
	if (a->position != b->position)
		return a->position < b->position ? -1 : 1;
	return 0;
}

const char *readmodel_entry_type(enum ledger_event_type type)
{
	switch (type) {
	case LEDGER_FUNDS_DEPOSITED:
		return "deposit";
	case LEDGER_FUNDS_WITHDRAWN:
		return "withdrawal";
	case LEDGER_TRANSFER_RECEIVED:
		return "transfer_in";
	case LEDGER_TRANSFER_SENT:
		return "transfer_out";
	default:
		return NULL;
	}
}

void readmodel_int128_text(__int128 v, char out[48])
{
	char tmp[48];
	size_t n = 0, i = 0;
	unsigned __int128 u = v < 0 ? -(unsigned __int128)v : (unsigned __int128)v;

	/* 128-bit divisions are library calls: only the digits beyond 64 bits take them
	 * (every amount and balance of an event fits in 64). */
	while (u > UINT64_MAX) {
		tmp[n++] = (char)('0' + (int)(u % 10));
		u /= 10;
	}
	for (uint64_t w = (uint64_t)u; n == 0 || w; w /= 10)
		tmp[n++] = (char)('0' + (int)(w % 10));
	if (v < 0)
		out[i++] = '-';
	while (n)
		out[i++] = tmp[--n];
	out[i] = '\0';
}
