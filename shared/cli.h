/* What every binary's command line shares: --help, --version, and the exit codes. */
#ifndef DAYBOOK_CLI_H
#define DAYBOOK_CLI_H

#include <getopt.h>

/* One exit-code scheme for every binary and subcommand (docs/cli.md). */
enum cli_exit {
	CLI_EXIT_OK = 0,          /* done */
	CLI_EXIT_PROBLEM = 1,     /* ran and found a problem or failed: verify differences,
				   * a migration or rebuild that failed (and was undone) */
	CLI_EXIT_USAGE = 2,       /* bad arguments or configuration */
	CLI_EXIT_UNAVAILABLE = 3, /* a dependency unavailable: PostgreSQL or Redis cannot be
				   * reached or failed under us, or the event store is not
				   * usable in this cluster (EVENTSTORE_EXIT_UNUSABLE) */
};

/* "daybook-admin 0.1.0 (1a2b3c4d5e6f)": the program name, meson's project version
 * and the git commit the binary was built from (left out when unknown), on stdout. */
void cli_print_version(const char *name);
/* The version alone ("0.1.0") and the commit ("" when unknown); static strings. */
const char *cli_version(void);
const char *cli_commit(void);

/* The options every binary takes; end a program's own option list with these two
 * entries' worth of handling ('h' and 'V'). */
#define CLI_COMMON_OPTIONS                                                                         \
	{ "help", no_argument, NULL, 'h' },                                                        \
	{                                                                                          \
		"version", no_argument, NULL, 'V'                                                  \
	}

#endif
