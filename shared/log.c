/* JSON-lines logging on stderr: time, level, service, message, request id. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
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

/* Append s to buf as the inside of a JSON string; truncates rather than overflows. */
static size_t escape(char *buf, size_t pos, size_t cap, const char *s)
{
	for (; *s && pos + 7 < cap; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			buf[pos++] = '\\';
			buf[pos++] = (char)c;
		} else if (c < 0x20 || c == 0x7f) {
			pos += (size_t)snprintf(buf + pos, cap - pos, "\\u%04x", c);
		} else {
			buf[pos++] = (char)c;
		}
	}
	return pos;
}

void log_msg(const struct log *log, enum log_level level, const char *request_id,
	     const char *fmt, ...)
{
	char msg[2048], line[4608], stamp[40];
	struct timespec ts;
	struct tm tm;
	va_list ap;
	size_t pos;

	if (level < log->level)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
	pos = (size_t)snprintf(line, sizeof(line),
			       "{\"time\":\"%s.%03ldZ\",\"level\":\"%s\",\"service\":\"%s\",\"msg\":\"",
			       stamp, ts.tv_nsec / 1000000, level_names[level], log->service);
	pos = escape(line, pos, sizeof(line) - 64, msg);
	if (request_id) {
		pos += (size_t)snprintf(line + pos, sizeof(line) - pos, "\",\"request_id\":\"");
		pos = escape(line, pos, sizeof(line) - 8, request_id);
	}
	pos += (size_t)snprintf(line + pos, sizeof(line) - pos, "\"}\n");
	/* One write per line keeps lines whole when several processes share a file. */
	fwrite(line, 1, pos, stderr);
	fflush(stderr);
}
