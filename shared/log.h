/* JSON-lines logging on stderr: time, level, service, message, request id. */
#ifndef DAYBOOK_LOG_H
#define DAYBOOK_LOG_H

#include <stdbool.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

/* A logger is plain configuration: it is set up once in main and passed around. */
struct log {
	const char *service; /* static string, e.g. "command" */
	enum log_level level;
};

/* Parse "debug|info|warn|error"; false when the text is none of them. */
bool log_level_parse(const char *text, enum log_level *out) __attribute__((warn_unused_result));

/* Write one line {"time","level","service","msg","request_id"?} to stderr.
 * request_id may be NULL. The message is escaped; never pass secrets. */
void log_msg(const struct log *log, enum log_level level, const char *request_id,
	     const char *fmt, ...) __attribute__((format(printf, 4, 5)));

#define log_debug(l, ...) log_msg((l), LOG_DEBUG, NULL, __VA_ARGS__)
#define log_info(l, ...) log_msg((l), LOG_INFO, NULL, __VA_ARGS__)
#define log_warn(l, ...) log_msg((l), LOG_WARN, NULL, __VA_ARGS__)
#define log_error(l, ...) log_msg((l), LOG_ERROR, NULL, __VA_ARGS__)

#endif
