/* What every service binary does first: --help, --version, its configuration, SIGPIPE. */
#ifndef DAYBOOK_SERVICE_H
#define DAYBOOK_SERVICE_H

#include "config.h"

/* Parse the command line (getopt_long): --help/-h prints `usage` on stdout, --version/-V
 * the version (both exit 0, whatever the configuration); any other argument prints
 * `usage` on stderr (exit 2). Then load the configuration
 * (`need`, `default_listen` as for config_load), reporting a bad setting on stderr as
 * "<name>: ..." (exit 2); ignore SIGPIPE. Returns -1 when the service should go on,
 * else the exit status to return from main. */
int service_init(int argc, char **argv, const char *name, const char *usage, unsigned need,
		 const char *default_listen, struct config *cfg) __attribute__((warn_unused_result));

struct log;
/* At start: refuse an event store whose txids this cluster has not reached (restored
 * from a logical dump into another cluster, see eventstore.h), with one line on stderr
 * ("<name>: ..."): returns EVENTSTORE_EXIT_UNUSABLE for main to return, else -1: go on.
 * When the check cannot run (PostgreSQL not reachable yet), logs a warning, returns -1,
 * and a background thread repeats the check every second until it gets an answer: on
 * a refusal it prints the same line and ends the process with that status. `name` and
 * cfg->pg must live as long as the process. */
int service_check_event_store(const char *name, const struct config *cfg,
			      const struct log *log) __attribute__((warn_unused_result));

#endif
