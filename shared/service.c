/* What every service binary does first: --help, --version, its configuration, SIGPIPE. */
#include "service.h"

#include "cli.h"
#include "eventstore.h"
#include "log.h"

#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int service_init(int argc, char **argv, const char *name, const char *usage, unsigned need,
		 const char *default_listen, struct config *cfg)
{
	static const struct option options[] = { CLI_COMMON_OPTIONS, { NULL, 0, NULL, 0 } };
	char err[512];
	int c;

	opterr = 0; /* our own message, then the usage */
	optind = 1;
	while ((c = getopt_long(argc, argv, "hV", options, NULL)) != -1) {
		switch (c) {
		case 'h':
			fputs(usage, stdout);
			return CLI_EXIT_OK;
		case 'V':
			cli_print_version(name);
			return CLI_EXIT_OK;
		default:
			fprintf(stderr, "%s: unknown option '%s'\n\n%s", name, argv[optind - 1], usage);
			return CLI_EXIT_USAGE;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "%s: unexpected argument '%s'\n\n%s", name, argv[optind], usage);
		return CLI_EXIT_USAGE;
	}
	if (!config_load(cfg, need, default_listen, err, sizeof(err))) {
		fprintf(stderr, "%s: %s\n", name, err);
		return CLI_EXIT_USAGE;
	}
	signal(SIGPIPE, SIG_IGN);
	return -1;
}

/* What the background check needs; lives as long as the process. */
struct deferred_check {
	const char *name;
	const char *conninfo;
};

/* Until PostgreSQL answers the check once: then either nothing more to do, or the same
 * refusal as at start. Exiting from here is as safe as being killed: every process
 * recovers from a crash at any point. */
static void *check_until_answered(void *arg)
{
	const struct deferred_check *c = arg;
	char msg[1024];

	for (;;) {
		sleep(1);
		switch (eventstore_check_txids_at(c->conninfo, msg, sizeof(msg))) {
		case EVENTSTORE_TXIDS_AHEAD:
			fprintf(stderr, "%s: %s\n", c->name, msg);
			_exit(EVENTSTORE_EXIT_UNUSABLE);
		case EVENTSTORE_OK:
			return NULL;
		case EVENTSTORE_UNCHECKED:
			break;
		}
	}
}

int service_check_event_store(const char *name, const struct config *cfg, const struct log *log)
{
	struct deferred_check *later;
	pthread_t tid;
	char msg[1024];

	switch (eventstore_check_txids_at(cfg->pg, msg, sizeof(msg))) {
	case EVENTSTORE_TXIDS_AHEAD:
		fprintf(stderr, "%s: %s\n", name, msg);
		return EVENTSTORE_EXIT_UNUSABLE;
	case EVENTSTORE_OK:
		return -1;
	case EVENTSTORE_UNCHECKED:
		break;
	}
	/* PostgreSQL is not there yet: start anyway, as always, and check in the
	 * background as soon as it answers. */
	log_warn(log, "%s; checking again every second in the background", msg);
	later = malloc(sizeof(*later));
	if (!later)
		return -1;
	later->name = name;
	later->conninfo = cfg->pg;
	if (pthread_create(&tid, NULL, check_until_answered, later) != 0) {
		free(later);
		return -1;
	}
	pthread_detach(tid);
	return -1;
}
