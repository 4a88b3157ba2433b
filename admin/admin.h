/* daybook-admin: the operator's tool; one function per subcommand. */
#ifndef DAYBOOK_ADMIN_H
#define DAYBOOK_ADMIN_H

#include "config.h"
#include "log.h"

struct admin_ctx {
	struct config cfg;
	struct log log;
};

/* Each returns the process exit status: 0 done, 1 failed, 2 usage. */
int admin_migrate(struct admin_ctx *ctx, int argc, char **argv);
int admin_rebuild(struct admin_ctx *ctx, int argc, char **argv);

#endif
