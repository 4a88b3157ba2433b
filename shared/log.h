/* JSON-lines logging on stderr: time, level, service, message, request id, and any
 * further fields. Every line is one valid JSON object, whatever bytes the message or
 * the fields hold: the standard members and a hand-built line's (log_line_*) are
 * escaped here as jansson escapes, the further fields of log_fields written by
 * jansson. */
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

/* Where to cut a text that is longer than n bytes so that no character is split: n, less
 * the incomplete UTF-8 sequence (a lead byte short of its continuation bytes) that the
 * first n bytes of text end with, if any. Bytes that are not UTF-8 are left alone
 * (log_text makes each one U+FFFD). */
size_t log_text_cut(const char *text, size_t n);

/* text folded onto one line as log_text does (line breaks and the blanks around them
 * become one space, trailing ones dropped), into out (cut to len - 1 bytes); returns
 * out. For plain-text messages on stderr, e.g. a libpq error after "...: ". */
const char *log_oneline(const char *text, char *out, size_t len);

/* Lines on their way out, kept by one event loop (not shared between threads) so
 * that the lines of one loop iteration leave in one write: the access lines of a
 * batch of answers, say. Up to PIPE_BUF bytes, so that a write of whole lines stays
 * whole on a pipe shared with other processes too. */
#define LOG_BUF_MAX 4096
struct log_buf {
	size_t len;
	char text[LOG_BUF_MAX];
	/* The lines' time of this second, "YYYY-MM-DDTHH:MM:SS", formatted once a second
	 * (zero-initialise the buffer). */
	long long second;
	char second_text[20];
};
/* Write what buf holds (nothing when empty). */
void log_buf_flush(struct log_buf *buf);

/* A line built by hand, without jansson or printf, for a hot path (the access line):
 * log_line_begin writes the standard members, the log_line_* calls add members, and
 * log_line_end closes it. Each string is escaped and made one line as log_text does. */
struct log_line {
	struct log_buf *buf;
	char *start, *p; /* the line so far, in buf or in heap */
	char *heap;      /* a line too long for buf, or one without buf */
};
/* The bytes a string of n bytes may take in a line, quotes included. */
size_t log_text_room(size_t n);
/* Start a line at `level` (check log_enabled first) whose further members take at
 * most `room` bytes (keys, values and punctuation; log_text_room for strings). With
 * buf the line is left in buf at log_line_end (the caller flushes it, with
 * log_buf_flush, before its loop sleeps); without, it is written at once. False when
 * out of memory (nothing to end). */
bool log_line_begin(struct log_line *ln, const struct log *log, struct log_buf *buf,
		    enum log_level level, const char *request_id, const char *msg, size_t room)
	__attribute__((warn_unused_result));
/* ,"key": (key is escaped too) */
void log_line_key(struct log_line *ln, const char *key);
/* A string member's value; NULL gives null. */
void log_line_text(struct log_line *ln, const char *text);
void log_line_int(struct log_line *ln, long long v);
/* Seconds as milliseconds with up to three decimals (a JSON real: "1.84", "2.0"). */
void log_line_millis(struct log_line *ln, double secs);
/* Text copied as it is: it must be valid JSON in its place. */
void log_line_raw(struct log_line *ln, const char *text, size_t n);
void log_line_end(struct log_line *ln);

#define log_debug(l, ...) log_msg((l), LOG_DEBUG, NULL, __VA_ARGS__)
#define log_info(l, ...) log_msg((l), LOG_INFO, NULL, __VA_ARGS__)
#define log_warn(l, ...) log_msg((l), LOG_WARN, NULL, __VA_ARGS__)
#define log_error(l, ...) log_msg((l), LOG_ERROR, NULL, __VA_ARGS__)

#endif
