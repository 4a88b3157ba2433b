/* daybook-admin: migrate the schema, rebuild, verify and inspect the read models. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "admin.h"
#include "cli.h"

static const char usage[] =
	"usage: daybook-admin [--help] [--version] <command> [options]\n"
	"\n"
	"Commands (each takes --help, which needs no configuration):\n"
	"  migrate [--dir DIR] [--new-identity] [--lock-timeout MS] [--lock-wait S]\n"
	"                        apply the SQL migrations in order, each once, with checksums\n"
	"  rebuild [redis|sql|all]\n"
	"                        rebuild read models from the event log while services run,\n"
	"                        then switch atomically\n"
	"  verify [--no-redis]   compare the read models with a fresh fold of the event log\n"
	"  status [--json]       the log's head, each projection's checkpoint and its lag\n"
	"  token new --id ID --scopes SCOPE[,SCOPE...]\n"
	"                        print a new API token and its line for DAYBOOK_TOKENS_FILE\n"
	"                        (scopes: write, read, admin); needs no database\n"
	"\n"
	"Exit status: 0 done; 1 found a problem (verify: differences) or failed (migrate,\n"
	"rebuild: nothing half done); 2 usage or configuration; 3 PostgreSQL or Redis\n"
	"unavailable, or the event store not usable in this cluster; 130 interrupted.\n"
	"\n"
	"Environment:\n"
	"  DAYBOOK_PG            libpq connection string or URI of a role that may run DDL\n"
	"                        (required, except by token)\n"
	"  DAYBOOK_REDIS         redis://[user[:password]@]host:port[/db] or unix:///path, ACL\n"
	"                        user daybook-admin (rebuild redis|all; verify and status\n"
	"                        check Redis only when it is set)\n"
	"  DAYBOOK_REDIS_PASSWORD_FILE\n"
	"                        the Redis password, instead of in DAYBOOK_REDIS\n"
	"  DAYBOOK_LOG_LEVEL     debug|info|warn|error (default info)\n";

static const struct {
	const char *name;
	int (*run)(struct admin_ctx *ctx, int argc, char **argv);
	const char *help;
} commands[] = {
	{ "migrate", admin_migrate,
	  "usage: daybook-admin migrate [--dir DIR] [--new-identity] [--lock-timeout MS]\n"
	  "                             [--lock-wait SECONDS]\n"
	  "\n"
	  "Apply the SQL migrations in DIR in order, each once, recording each file's SHA-256;\n"
	  "a changed file that was already applied is refused. Concurrent runs queue.\n"
	  "\n"
	  "  -d, --dir DIR        the migrations (default: DAYBOOK_MIGRATIONS, else the\n"
	  "                       project's sql/)\n"
	  "      --new-identity   then give the event store a new deployment id (after a\n"
	  "                       physical restore: see docs/operations.md)\n"
	  "      --lock-timeout MS  wait at most MS for each lock a migration takes (default\n"
	  "                       2000): a migration that needs a table's exclusive lock while a\n"
	  "                       long transaction uses the table would hold every append and\n"
	  "                       read of it behind itself; it gives way, and is tried again\n"
	  "      --lock-wait S    keep trying for S seconds in all (default 60), then fail\n"
	  "  -h, --help           this text\n"
	  "\n"
	  "Exit status: 0 applied (or nothing to do); 1 a migration failed or a file changed\n"
	  "(nothing of it is left); 2 usage or configuration; 3 PostgreSQL unreachable.\n" },
	{ "rebuild", admin_rebuild,
	  "usage: daybook-admin rebuild [redis|sql|all]\n"
	  "\n"
	  "Rebuild the read models from the event log into shadow tables and a new Redis\n"
	  "generation while the services run, then switch atomically (default: all).\n"
	  "Ctrl-C or SIGTERM before the switch leaves the live models as they were.\n"
	  "On a terminal: a progress bar on stderr and a summary line on stdout. Otherwise\n"
	  "JSON lines on stdout to the end: progress, errors and notes (\"phase\" \"error\",\n"
	  "\"note\"), then one final line with \"phase\" \"done\", \"failed\" or\n"
	  "\"interrupted\".\n"
	  "\n"
	  "  -h, --help           this text\n"
	  "\n"
	  "Environment: DAYBOOK_REBUILD_HELD_MAX, the statement items held for Redis to send\n"
	  "an account's together before sending all it holds (default 200000).\n"
	  "\n"
	  "Exit status: 0 rebuilt; 1 failed (live models untouched); 2 usage or\n"
	  "configuration; 3 PostgreSQL or Redis unreachable, or the event store not usable\n"
	  "here; 130 interrupted.\n" },
	{ "verify", admin_verify,
	  "usage: daybook-admin verify [--no-redis]\n"
	  "\n"
	  "Fold the event log independently and compare it with the SQL read models and\n"
	  "Redis's live generation, field by field: one DIFF line per difference.\n"
	  "\n"
	  "      --no-redis       compare the SQL read models only\n"
	  "  -h, --help           this text\n"
	  "\n"
	  "Exit status: 0 equal; 1 differences; 2 usage or configuration; 3 PostgreSQL or\n"
	  "Redis unreachable or failing (the comparison could not finish), or the event store\n"
	  "not usable here.\n" },
	{ "status", admin_status,
	  "usage: daybook-admin status [--json]\n"
	  "\n"
	  "The log's head, each projection's checkpoint and its lag, and Redis's live\n"
	  "generation when DAYBOOK_REDIS is set.\n"
	  "\n"
	  "      --json           one JSON object instead of a table\n"
	  "  -h, --help           this text\n"
	  "\n"
	  "Exit status: 0 printed; 2 usage or configuration; 3 PostgreSQL unreachable, or the\n"
	  "event store not usable here.\n" },
	{ "token", admin_token,
	  "usage: daybook-admin token new --id ID --scopes SCOPE[,SCOPE...]\n"
	  "\n"
	  "Print a new API token (line 1) and its line for DAYBOOK_TOKENS_FILE (line 2):\n"
	  "'<id> <sha256 hex> <scopes>'. The token itself is stored nowhere: give it to the\n"
	  "client now. Needs no database and no configuration.\n"
	  "\n"
	  "  -i, --id ID          the token's id: 1-64 characters of [A-Za-z0-9._:-]\n"
	  "  -s, --scopes LIST    write, read, admin, comma-separated, each at most once\n"
	  "  -h, --help           this text\n"
	  "\n"
	  "Exit status: 0 printed; 1 no random bytes or stdout failed; 2 usage.\n" },
};

static const char *help_of(const char *command)
{
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strcmp(commands[i].name, command) == 0)
			return commands[i].help;
	return usage;
}

int admin_help(const char *command)
{
	fputs(help_of(command), stdout);
	return CLI_EXIT_OK;
}

int admin_usage_error(const char *command, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "daybook-admin %s: ", command);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n\n%s", help_of(command));
	return CLI_EXIT_USAGE;
}

int admin_getopt_error(const char *command, int argc, char **argv, int c)
{
	const char *arg = optind - 1 < argc && optind > 0 ? argv[optind - 1] : "?";

	if (c == ':')
		return admin_usage_error(command, "option '%s' needs a value", arg);
	return admin_usage_error(command, "unknown option '%s'", arg);
}

bool admin_configure(struct admin_ctx *ctx, const char *command)
{
	char err[512];

	(void)command; /* ctx->log names it already */
	if (!config_load(&ctx->cfg, CONFIG_NEED_PG, NULL, err, sizeof(err))) {
		log_error(&ctx->log, "%s", err);
		return false;
	}
	ctx->log.level = ctx->cfg.log_level;
	return true;
}

int main(int argc, char **argv)
{
	static const struct option options[] = { CLI_COMMON_OPTIONS, { NULL, 0, NULL, 0 } };
	struct admin_ctx ctx = {
		.log = { .service = "daybook-admin", .level = LOG_INFO, .plain = true }
	};
	int c;

	/* A lost Redis or PostgreSQL connection is an error to report and clean up
	 * after, not a signal that ends the process mid-way. */
	signal(SIGPIPE, SIG_IGN);
	opterr = 0;
	/* '+': options before the command only; the command parses its own. */
	while ((c = getopt_long(argc, argv, "+hV", options, NULL)) != -1) {
		switch (c) {
		case 'h':
			fputs(usage, stdout);
			return CLI_EXIT_OK;
		case 'V':
			cli_print_version("daybook-admin");
			return CLI_EXIT_OK;
		default:
			fprintf(stderr, "daybook-admin: unknown option '%s'\n\n%s",
				argv[optind - 1], usage);
			return CLI_EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		fprintf(stderr, "daybook-admin: no command given\n\n%s", usage);
		return CLI_EXIT_USAGE;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(argv[optind], commands[i].name) != 0)
			continue;
		/* The command sees argv from its own name on, and starts getopt afresh. */
		argc -= optind;
		argv += optind;
		optind = 0;
		snprintf(ctx.service, sizeof(ctx.service), "daybook-admin %s", commands[i].name);
		ctx.log.service = ctx.service;
		return commands[i].run(&ctx, argc, argv);
	}
	fprintf(stderr, "daybook-admin: unknown command '%s'\n\n%s", argv[optind], usage);
	return CLI_EXIT_USAGE;
}
