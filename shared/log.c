/* JSON-lines logging on stderr: time, level, service, message, request id. */
#include "log.h"

#include <stdarg.h>
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

json_t *log_textn(const char *text, size_t n)
{
	const unsigned char *s = (const unsigned char *)text;
	char *out;
	size_t o = 0;
	json_t *str;

	/* Each input byte gives at most 3 output bytes (U+FFFD). */
	out = malloc(3 * n + 1);
	if (!out)
		return NULL;
	for (size_t i = 0; i < n;) {
		size_t k;
		if (s[i] == '\r' || s[i] == '\n') {
			/* A line break with the blanks around it: one space. */
			while (o > 0 && (out[o - 1] == ' ' || out[o - 1] == '\t'))
				o--;
			while (i < n &&
			       (s[i] == '\r' || s[i] == '\n' || s[i] == ' ' || s[i] == '\t'))
				i++;
			if (o > 0 && i < n)
				out[o++] = ' ';
			continue;
		}
		k = utf8_len(s + i, n - i);
		if (k == 0) {
			memcpy(out + o, "\xef\xbf\xbd", 3);
			o += 3;
			i++;
			continue;
		}
		memcpy(out + o, s + i, k);
		o += k;
		i += k;
	}
	str = json_stringn_nocheck(out, o); /* checked above: valid UTF-8 */
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

void log_fields(const struct log *log, enum log_level level, const char *request_id,
		const char *msg, json_t *fields)
{
	char stamp[40], when[64];
	struct timespec ts;
	struct tm tm;
	json_t *line = NULL;
	char *text = NULL;
	size_t len;

	if (level < log->level)
		goto done;
	if (log->plain) {
		plain_line(log, level, msg);
		goto done;
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(when, sizeof(when), "%s.%03ldZ", stamp, ts.tv_nsec / 1000000);
	line = json_object();
	if (!line || json_object_set_new(line, "time", json_string(when)) ||
	    json_object_set_new(line, "level", json_string(level_names[level])) ||
	    json_object_set_new(line, "service", log_text(log->service)) ||
	    json_object_set_new(line, "msg", log_text(msg)) ||
	    (request_id && json_object_set_new(line, "request_id", log_text(request_id))) ||
	    (fields && json_object_update(line, fields)))
		goto done;
	text = json_dumps(line, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
	if (!text)
		goto done;
	len = strlen(text);
	text[len] = '\n'; /* replaces the NUL: the line is written with its length */
	/* One write per line keeps lines whole when several processes share a file. */
	fwrite(text, 1, len + 1, stderr);
	fflush(stderr);
done:
	free(text);
	json_decref(line);
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
