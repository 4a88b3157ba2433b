/* daybook-admin: the operator's tool; one function per subcommand. */
#ifndef DAYBOOK_ADMIN_H
#define DAYBOOK_ADMIN_H

#include <libpq-fe.h>
#include <stdbool.h>

#include "config.h"
#include "eventstore.h"
#include "log.h"

struct admin_ctx {
	struct config cfg;
	struct log log;   /* plain lines "daybook-admin <command>: ..." on stderr */
	char service[48]; /* log.service: "daybook-admin <command>" */
};

/* Each parses its own options (getopt_long from argv[0], the command's name; --help
 * answered before any configuration is read), then calls admin_configure, and returns
 * the process exit status (CLI_EXIT_*, cli.h; docs/cli.md). */
int admin_migrate(struct admin_ctx *ctx, int argc, char **argv);
int admin_rebuild(struct admin_ctx *ctx, int argc, char **argv);
/* verify: 0 the read models equal a fresh fold of the log, 1 differences, 2 usage, 3
 * the verification could not run (no connection, a failed query) or
 * (EVENTSTORE_EXIT_UNUSABLE) the log holds txids this cluster has not reached. */
int admin_verify(struct admin_ctx *ctx, int argc, char **argv);
/* token new: 0 printed a token and its tokens-file line, 1 failed, 2 usage. Reads no
 * configuration (ctx->cfg is not loaded). */
int admin_token(struct admin_ctx *ctx, int argc, char **argv);
/* status: 0 printed, 2 usage, 3 PostgreSQL unreachable or as for verify. */
int admin_status(struct admin_ctx *ctx, int argc, char **argv);

/* --help of a command (its usage on stdout): CLI_EXIT_OK. */
int admin_help(const char *command);
/* "daybook-admin <command>: <message>" and the command's usage on stderr:
 * CLI_EXIT_USAGE. */
int admin_usage_error(const char *command, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* The same for the option getopt_long just refused: c is what it returned ('?' an
 * unknown option, ':' a missing value: option strings start with "+:"). */
int admin_getopt_error(const char *command, int argc, char **argv, int c);
/* Load the configuration (DAYBOOK_*) into ctx; false after one line on stderr naming
 * the setting (then exit CLI_EXIT_USAGE). */
bool admin_configure(struct admin_ctx *ctx, const char *command)
	__attribute__((warn_unused_result));

/* False, with one line in log ("daybook-admin <command>: ..."), when the event store
 * holds txids this cluster has not reached (eventstore_check_txids). */
bool admin_event_store_usable(PGconn *conn, const struct log *log)
	__attribute__((warn_unused_result));

struct redisContext;
struct config_redis;
/* A blocking hiredis connection (2 s to connect, 30 s per command), with the db
 * SELECTed. NULL with a reason in err on failure. Caller frees with redisFree. */
struct redisContext *admin_redis_connect(const struct config_redis *server, char *err,
					 size_t errlen);

#endif
