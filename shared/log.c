/* JSON-lines logging on stderr: time, level, service, message, request id. */
#include "log.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const level_names[] = { "debug", "info", "warn", "error" };

bool log_level_parse(const char *text, enum log_level *out)
{
	for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
		if (strcmp(text, level_names[i]) == 0) {
			*out = (enum log_level)i;
			return true;
		}
	}
	return false;
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), 0 when invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
	size_t len;
	unsigned cp;

	if (s[0] < 0x80)
		return s[0] ? 1 : 0;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		len = 2, cp = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		len = 3, cp = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		len = 4, cp = s[0] & 0x07;
	else
		return 0;
	if (len > n)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
	    (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0; /* overlong, surrogate, beyond Unicode */
	return len;
}

size_t log_text_cut(const char *text, size_t n)
{
	const unsigned char *s = (const unsigned char *)text;
	size_t lead = n, len;

	/* Back over the continuation bytes at the end (a character has at most three). */
	while (lead > 0 && n - lead < 3 && (s[lead - 1] & 0xc0) == 0x80)
		lead--;
	if (lead == 0)
		return n;
	lead--;
	len = s[lead] >= 0xc2 && s[lead] <= 0xdf   ? 2
	      : s[lead] >= 0xe0 && s[lead] <= 0xef ? 3
	      : s[lead] >= 0xf0 && s[lead] <= 0xf4 ? 4
						   : 0;
	return len > n - lead ? lead : n;
}

/* The bytes of `text` (n of them) as log_text gives them, into out: invalid UTF-8 bytes
 * become U+FFFD, each line break with the blanks around it one space. With `json`
 * they are escaped for the inside of a JSON string as jansson escapes them (quote,
 * backslash, \b \f \n \r \t, other control bytes as \u00XX); then out needs room
 * for TEXT_ROOM(n) bytes, else for 3 n. Returns the length written. */
#define TEXT_ROOM(n) (6 * (n))
static size_t fold_text(char *out, const unsigned char *s, size_t n, bool json)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t o = 0, blanks = SIZE_MAX; /* where the trailing run of blanks starts */

	for (size_t i = 0; i < n;) {
		size_t k, run = 0;
		/* A run of printable ASCII other than blanks, quote and backslash (most of
		 * any text): copied as it is. */
		while (i + run < n && s[i + run] > 0x20 && s[i + run] < 0x7f && s[i + run] != '"' &&
		       s[i + run] != '\\')
			run++;
		if (run > 0) {
			memcpy(out + o, s + i, run);
			o += run;
			i += run;
			blanks = SIZE_MAX;
			continue;
		}
		if (s[i] == '\r' || s[i] == '\n') {
			/* A line break with the blanks around it: one space. */
			if (blanks != SIZE_MAX)
				o = blanks;
			while (i < n &&
			       (s[i] == '\r' || s[i] == '\n' || s[i] == ' ' || s[i] == '\t'))
				i++;
			blanks = SIZE_MAX;
			if (o > 0 && i < n) {
				blanks = o;
				out[o++] = ' ';
			}
			continue;
		}
		if (s[i] == ' ' || s[i] == '\t') {
			if (blanks == SIZE_MAX)
				blanks = o;
		} else {
			blanks = SIZE_MAX;
		}
		k = utf8_len(s + i, n - i);
		if (k == 0) {
			memcpy(out + o, "\xef\xbf\xbd", 3);
			o += 3;
			i++;
			continue;
		}
		if (json && (s[i] < 0x20 || s[i] == '"' || s[i] == '\\')) {
			const char *esc = s[i] == '"'    ? "\\\""
					  : s[i] == '\\' ? "\\\\"
					  : s[i] == '\b' ? "\\b"
					  : s[i] == '\f' ? "\\f"
					  : s[i] == '\t' ? "\\t"
							 : NULL;
			if (esc) {
				memcpy(out + o, esc, 2);
				o += 2;
			} else {
				memcpy(out + o, "\\u00", 4);
				out[o + 4] = hex[s[i] >> 4];
				out[o + 5] = hex[s[i] & 0xf];
				o += 6;
			}
			i++;
			continue;
		}
		memcpy(out + o, s + i, k);
		o += k;
		i += k;
	}
	return o;
}

json_t *log_textn(const char *text, size_t n)
{
	/* Each input byte gives at most 3 output bytes (U+FFFD). */
	char *out = malloc(3 * n + 1);
	json_t *str;

	if (!out)
		return NULL;
	/* checked by fold_text: valid UTF-8 */
	str = json_stringn_nocheck(out, fold_text(out, (const unsigned char *)text, n, false));
	free(out);
	return str;
}

const char *log_oneline(const char *text, char *out, size_t len)
{
	size_t o = 0;

	if (len == 0)
		return out;
	for (const char *s = text ? text : ""; *s && o + 1 < len;) {
		if (*s == '\r' || *s == '\n') {
			while (o > 0 && (out[o - 1] == ' ' || out[o - 1] == '\t'))
				o--;
			while (*s == '\r' || *s == '\n' || *s == ' ' || *s == '\t')
				s++;
			if (o > 0 && *s)
				out[o++] = ' ';
			continue;
		}
		out[o++] = *s++;
	}
	while (o > 0 && (out[o - 1] == ' ' || out[o - 1] == '\t'))
		o--;
	out[o] = '\0';
	return out;
}

json_t *log_text(const char *text)
{
	return log_textn(text ? text : "", text ? strlen(text) : 0);
}

/* "<service>: [note: ]<msg>" on one line, written at once. */
static void plain_line(const struct log *log, enum log_level level, const char *msg)
{
	const char *note = level == LOG_WARN ? "note: " : "";
	size_t room = strlen(log->service) + strlen(note) + strlen(msg) + 4;
	char *line = malloc(room);
	int n;

	if (!line)
		return;
	n = snprintf(line, room, "%s: %s", log->service, note);
	log_oneline(msg, line + n, room - (size_t)n - 1);
	n = (int)strlen(line);
	line[n] = '\n';
	fwrite(line, 1, (size_t)n + 1, stderr);
	fflush(stderr);
	free(line);
}

/* Write len bytes of whole lines at once (one write keeps lines whole when several
 * processes share a file or a pipe). */
static void write_lines(const char *text, size_t len)
{
	if (len == 0)
		return;
	fwrite(text, 1, len, stderr);
	fflush(stderr);
}

void log_buf_flush(struct log_buf *buf)
{
	write_lines(buf->text, buf->len);
	buf->len = 0;
}

static void put(struct log_line *ln, const char *text, size_t n)
{
	memcpy(ln->p, text, n);
	ln->p += n;
}

static void put_text(struct log_line *ln, const char *text, size_t n)
{
	*ln->p++ = '"';
	ln->p += fold_text(ln->p, (const unsigned char *)text, n, true);
	*ln->p++ = '"';
}

size_t log_text_room(size_t n)
{
	return TEXT_ROOM(n) + 2;
}

/* "2026-12-06T18:40:02.113Z" into out (25 bytes with the NUL). */
/* Now, "YYYY-MM-DDTHH:MM:SS.mmmZ"; the seconds formatted once a second when buf (NULL:
 * none) keeps them. */
static void timestamp(char out[25], struct log_buf *buf)
{
	struct timespec ts;
	struct tm tm;
	long ms;

	clock_gettime(CLOCK_REALTIME, &ts);
	if (!buf || (long long)ts.tv_sec != buf->second || !buf->second_text[0]) {
		gmtime_r(&ts.tv_sec, &tm);
		strftime(out, 25, "%Y-%m-%dT%H:%M:%S", &tm);
		if (buf) {
			memcpy(buf->second_text, out, 19);
			buf->second_text[19] = '\0';
			buf->second = (long long)ts.tv_sec;
		}
	} else {
		memcpy(out, buf->second_text, 19);
	}
	ms = ts.tv_nsec / 1000000;
	out[19] = '.';
	out[20] = (char)('0' + ms / 100);
	out[21] = (char)('0' + ms / 10 % 10);
	out[22] = (char)('0' + ms % 10);
	out[23] = 'Z';
	out[24] = '\0';
}

bool log_line_begin(struct log_line *ln, const struct log *log, struct log_buf *buf,
		    enum log_level level, const char *request_id, const char *msg, size_t room)
{
	size_t need = 96 + log_text_room(strlen(log->service)) + log_text_room(strlen(msg)) +
		      (request_id ? 16 + log_text_room(strlen(request_id)) : 0) + room;
	char when[25];

	*ln = (struct log_line){ .buf = buf };
	if (buf && need > sizeof(buf->text) - buf->len)
		log_buf_flush(buf);
	if (buf && need <= sizeof(buf->text)) {
		ln->start = buf->text + buf->len;
	} else {
		ln->heap = malloc(need);
		if (!ln->heap)
			return false;
		ln->start = ln->heap;
	}
	ln->p = ln->start;
	timestamp(when, buf);
	put(ln, "{\"time\":\"", 9);
	put(ln, when, 24);
	put(ln, "\",\"level\":\"", 11);
	put(ln, level_names[level], strlen(level_names[level]));
	put(ln, "\",\"service\":", 12);
	put_text(ln, log->service, strlen(log->service));
	put(ln, ",\"msg\":", 7);
	put_text(ln, msg, strlen(msg));
	if (request_id) {
		put(ln, ",\"request_id\":", 14);
		put_text(ln, request_id, strlen(request_id));
	}
	return true;
}

void log_line_key(struct log_line *ln, const char *key)
{
	*ln->p++ = ',';
	put_text(ln, key, strlen(key));
	*ln->p++ = ':';
}

void log_line_text(struct log_line *ln, const char *text)
{
	if (text)
		put_text(ln, text, strlen(text));
	else
		put(ln, "null", 4);
}

void log_line_int(struct log_line *ln, long long v)
{
	char digits[24];
	size_t n = 0;
	unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;

	do
		digits[sizeof(digits) - ++n] = (char)('0' + u % 10);
	while (u /= 10);
	if (v < 0)
		digits[sizeof(digits) - ++n] = '-';
	put(ln, digits + sizeof(digits) - n, n);
}

void log_line_millis(struct log_line *ln, double secs)
{
	long long us = secs > 0 ? (long long)(secs * 1e6 + 0.5) : 0;
	char frac[4] = { (char)('0' + us / 100 % 10), (char)('0' + us / 10 % 10),
			 (char)('0' + us % 10), 0 };
	size_t n = 3;

	log_line_int(ln, us / 1000);
	while (n > 1 && frac[n - 1] == '0')
		n--;
	*ln->p++ = '.';
	put(ln, frac, n);
}

void log_line_raw(struct log_line *ln, const char *text, size_t n)
{
	put(ln, text, n);
}

void log_line_end(struct log_line *ln)
{
	put(ln, "}\n", 2);
	if (ln->heap) {
		if (ln->buf)
			log_buf_flush(ln->buf); /* what came before goes first */
		write_lines(ln->heap, (size_t)(ln->p - ln->heap));
		free(ln->heap);
	} else if (ln->buf) {
		ln->buf->len += (size_t)(ln->p - ln->start);
	}
	*ln = (struct log_line){ 0 };
}

void log_fields(const struct log *log, enum log_level level, const char *request_id,
		const char *msg, json_t *fields)
{
	struct log_line ln;
	char *text = NULL;
	size_t len = 0;

	if (level < log->level)
		goto done;
	if (log->plain) {
		plain_line(log, level, msg);
		goto done;
	}
	if (fields) {
		text = json_dumps(fields,
				  JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
		if (!text)
			goto done;
		len = strlen(text); /* "{...}": the members go after the standard ones */
	}
	if (!log_line_begin(&ln, log, NULL, level, request_id, msg, len))
		goto done;
	if (len > 2) {
		log_line_raw(&ln, ",", 1);
		log_line_raw(&ln, text + 1, len - 2);
	}
	log_line_end(&ln);
done:
	free(text);
	json_decref(fields);
}

void log_msg(const struct log *log, enum log_level level, const char *request_id, const char *fmt,
	     ...)
{
	char small[1024], *msg = small;
	va_list ap;
	int n;

	if (level < log->level)
		return;
	va_start(ap, fmt);
	n = vsnprintf(small, sizeof(small), fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof(small) && (msg = malloc((size_t)n + 1))) {
		va_start(ap, fmt);
		vsnprintf(msg, (size_t)n + 1, fmt, ap);
		va_end(ap);
	} else if (n >= (int)sizeof(small)) {
		msg = small; /* out of memory: the message cut short */
	}
	log_fields(log, level, request_id, n < 0 ? fmt : msg, NULL);
	if (msg != small)
		free(msg);
}
