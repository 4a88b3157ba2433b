/* What every service binary does first: --help, its configuration, SIGPIPE. */
#include "service.h"

#include "eventstore.h"
#include "log.h"

#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

int service_init(int argc, char **argv, const char *name, const char *usage, unsigned need,
		 const char *default_listen, struct config *cfg)
{
	char err[512];

	if (argc > 1) {
		bool help = strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0;
		fputs(usage, help ? stdout : stderr);
		return help ? 0 : 2;
	}
	if (!config_load(cfg, need, default_listen, err, sizeof(err))) {
		fprintf(stderr, "%s: %s\n", name, err);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	return -1;
}

int service_check_event_store(const char *name, const struct config *cfg, const struct log *log)
{
	char msg[1024];

	switch (eventstore_check_txids_at(cfg->pg, msg, sizeof(msg))) {
	case EVENTSTORE_TXIDS_AHEAD:
		fprintf(stderr, "%s: %s\n", name, msg);
		return EVENTSTORE_EXIT_UNUSABLE;
	case EVENTSTORE_UNCHECKED:
		log_warn(log, "%s", msg);
		break;
	case EVENTSTORE_OK:
		break;
	}
	return -1;
}
