/* JSON-lines logging on stderr: time, level, service, message, request id, and any
 * further fields. Every line is one valid JSON object (written by jansson), whatever
 * bytes the message or the fields hold. */
#ifndef DAYBOOK_LOG_H
#define DAYBOOK_LOG_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

/* A logger is plain configuration: it is set up once in main and passed around. */
struct log {
	const char *service; /* static string, e.g. "command" */
	enum log_level level;
	/* A command-line tool's log (daybook-admin): plain lines "<service>: <msg>", warnings
	 * as "<service>: note: <msg>", for a person at a terminal; no JSON, no time, and
	 * request ids and fields are left out. */
	bool plain;
};

/* Parse "debug|info|warn|error"; false when the text is none of them. */
bool log_level_parse(const char *text, enum log_level *out) __attribute__((warn_unused_result));

/* True when a line at `level` would be written (to skip building one that is not). */
static inline bool log_enabled(const struct log *log, enum log_level level)
{
	return level >= log->level;
}

/* Write one line {"time","level","service","msg","request_id"?} to stderr.
 * request_id may be NULL. The message is made one line (see log_text); never pass
 * secrets. */
void log_msg(const struct log *log, enum log_level level, const char *request_id, const char *fmt,
	     ...) __attribute__((format(printf, 4, 5)));

/* The same line with the members of `fields` (a JSON object, may be NULL; stolen)
 * added after the standard ones. */
void log_fields(const struct log *log, enum log_level level, const char *request_id,
		const char *msg, json_t *fields);

/* text as a JSON string fit for a log line: invalid UTF-8 bytes become U+FFFD, and each
 * line break (with the blanks around it) becomes one space, trailing ones dropped, so
 * that libpq's and hiredis's multi-line errors read as one line. NULL text gives "".
 * New reference; NULL only when out of memory. */
json_t *log_text(const char *text);
/* The same for the first len bytes of text (which may hold NULs: they become U+FFFD). */
json_t *log_textn(const char *text, size_t len);

/* text folded onto one line as log_text does (line breaks and the blanks around them
 * become one space, trailing ones dropped), into out (cut to len - 1 bytes); returns
 * out. For plain-text messages on stderr, e.g. a libpq error after "...: ". */
const char *log_oneline(const char *text, char *out, size_t len);

#define log_debug(l, ...) log_msg((l), LOG_DEBUG, NULL, __VA_ARGS__)
#define log_info(l, ...) log_msg((l), LOG_INFO, NULL, __VA_ARGS__)
#define log_warn(l, ...) log_msg((l), LOG_WARN, NULL, __VA_ARGS__)
#define log_error(l, ...) log_msg((l), LOG_ERROR, NULL, __VA_ARGS__)

#endif
