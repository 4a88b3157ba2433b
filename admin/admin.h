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
	struct log log;
};

/* Each returns the process exit status: 0 done, 1 failed, 2 usage. */
int admin_migrate(struct admin_ctx *ctx, int argc, char **argv);
int admin_rebuild(struct admin_ctx *ctx, int argc, char **argv);
/* verify: 0 the read models equal a fresh fold of the log, 1 differences, 2 usage or
 * the verification could not run (no connection, a failed query), 3
 * (EVENTSTORE_EXIT_UNUSABLE) the log holds txids this cluster has not reached. */
int admin_verify(struct admin_ctx *ctx, int argc, char **argv);
/* token new: 0 printed a token and its tokens-file line, 1 failed, 2 usage. Reads no
 * configuration (ctx->cfg is not loaded). */
int admin_token(struct admin_ctx *ctx, int argc, char **argv);
/* status: 0 printed, 1 PostgreSQL unreachable, 2 usage, 3 as for verify. */
int admin_status(struct admin_ctx *ctx, int argc, char **argv);

/* False, with one line on stderr ("daybook-admin <command>: ..."), when the event
 * store holds txids this cluster has not reached (eventstore_check_txids). */
bool admin_event_store_usable(PGconn *conn, const char *command)
	__attribute__((warn_unused_result));

struct redisContext;
struct config_redis;
/* A blocking hiredis connection (2 s to connect, 30 s per command), with the db
 * SELECTed. NULL with a reason in err on failure. Caller frees with redisFree. */
struct redisContext *admin_redis_connect(const struct config_redis *server, char *err,
					 size_t errlen);

#endif
