/* daybook-admin: migrate the schema, rebuild, verify and inspect the read models. */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "admin.h"

static const char usage[] =
	"usage: daybook-admin <command> [options]\n"
	"\n"
	"Commands:\n"
	"  migrate [--dir DIR] [--new-identity]\n"
	"                        apply the SQL migrations in DIR (default: the project's sql/,\n"
	"                        or DAYBOOK_MIGRATIONS) in order, each once, with checksums;\n"
	"                        --new-identity then gives the event store a new deployment\n"
	"                        id (after a physical restore: see docs/operations.md)\n"
	"  rebuild [redis|sql|all]\n"
	"                        rebuild read models from the event log into shadow tables /\n"
	"                        a new Redis generation while services run, then switch\n"
	"                        atomically (default all); Ctrl-C leaves the live models as\n"
	"                        they were\n"
	"  verify [--no-redis]   fold the event log independently and compare it with the SQL\n"
	"                        read models and Redis's live generation, field by field;\n"
	"                        prints one DIFF line per difference, exit 1 on any\n"
	"  status [--json]       the log's head, each projection's checkpoint and its lag\n"
	"  token new --id ID --scopes SCOPE[,SCOPE...]\n"
	"                        print a new API token and its line for DAYBOOK_TOKENS_FILE\n"
	"                        (scopes: write, read, admin); needs no database\n"
	"\n"
	"Environment:\n"
	"  DAYBOOK_PG            libpq connection string or URI of a role that may run DDL\n"
	"                        (required, except by token)\n"
	"  DAYBOOK_REDIS         redis://[user[:password]@]host:port[/db] or unix:///path, ACL\n"
	"                        user daybook-admin (rebuild redis|all; verify and status\n"
	"                        check Redis only when it is set)\n"
	"  DAYBOOK_REDIS_PASSWORD_FILE\n"
	"                        the Redis password, instead of in DAYBOOK_REDIS\n"
	"  DAYBOOK_LOG_LEVEL     debug|info|warn|error (default info)\n"
	"  DAYBOOK_REBUILD_HELD_MAX\n"
	"                        statement items rebuild holds for Redis, to send an account's\n"
	"                        together, before it sends all it holds (default 200000)\n";

static const struct {
	const char *name;
	int (*run)(struct admin_ctx *ctx, int argc, char **argv);
	bool needs_config; /* reads DAYBOOK_PG and the rest of the environment */
} commands[] = {
	{ "migrate", admin_migrate, true },
	{ "rebuild", admin_rebuild, true },
	{ "verify", admin_verify, true },
	{ "status", admin_status, true },
	{ "token", admin_token, false },
};

int main(int argc, char **argv)
{
	struct admin_ctx ctx = { .log = { .service = "admin", .level = LOG_INFO } };
	char err[512];

	/* A lost Redis or PostgreSQL connection is an error to report and clean up
	 * after, not a signal that ends the process mid-way. */
	signal(SIGPIPE, SIG_IGN);
	if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
		fputs(usage, argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(argv[1], commands[i].name) != 0)
			continue;
		if (!commands[i].needs_config)
			return commands[i].run(&ctx, argc - 1, argv + 1);
		if (!config_load(&ctx.cfg, CONFIG_NEED_PG, NULL, err, sizeof(err))) {
			fprintf(stderr, "daybook-admin: %s\n", err);
			return 2;
		}
		ctx.log.level = ctx.cfg.log_level;
		return commands[i].run(&ctx, argc - 1, argv + 1);
	}
	fprintf(stderr, "daybook-admin: unknown command '%s'\n\n%s", argv[1], usage);
	return 2;
}
