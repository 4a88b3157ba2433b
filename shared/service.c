/* What every service binary shares: main() from the command line (--help, --version,
 * its configuration, SIGPIPE) through its loop and signals to the last teardown. */
#include "service.h"

#include "cli.h"
#include "eventstore.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "tokens.h"

#include <event2/event.h>
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
			fprintf(stderr, "%s: unknown option '%s'\n\n%s", name, argv[optind - 1],
				usage);
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

/* The first SIGTERM or SIGINT: the same first steps in every service, then its own. */
static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct service_ctx *svc = arg;

	(void)what;
	if (svc->stopping)
		return;
	log_info(&svc->log, "signal %d: %s", (int)sig, svc->def->stopping);
	svc->stopping = true;
	http_server_stop_accepting(svc->http);
	svc->def->on_stop(svc);
}

/* Configuration, tokens, event base and metrics: -1 to go on, else the exit status. */
static int open_common(int argc, char **argv, const struct service_def *def,
		       struct service_ctx *svc)
{
	char err[512];
	int rc = service_init(argc, argv, def->name, def->usage, def->need, def->default_listen,
			      &svc->cfg);

	if (rc >= 0)
		return rc;
	svc->def = def;
	svc->log = (struct log){ .service = def->log_name, .level = svc->cfg.log_level };
	if (def->configure) {
		rc = def->configure(svc);
		if (rc >= 0)
			return rc;
	}
	if ((def->need & CONFIG_NEED_TOKENS) &&
	    tokens_open(&svc->tokens, svc->cfg.tokens_file, err, sizeof(err))) {
		fprintf(stderr, "%s: DAYBOOK_TOKENS_FILE: %s\n", def->name, err);
		return CLI_EXIT_USAGE;
	}
	svc->base = service_event_base_new();
	if (!svc->base || metrics_open(&svc->metrics)) {
		fprintf(stderr, "%s: cannot set up the event loop\n", def->name);
		return 1;
	}
	return -1;
}

struct event_base *service_event_base_new(void)
{
	struct event_config *cfg = event_config_new();
	struct event_base *base;

	if (!cfg)
		return NULL;
	event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
	base = event_base_new_with_config(cfg);
	event_config_free(cfg);
	return base;
}

/* SIGTERM and SIGINT on svc's loop: 0, or the exit status. */
static int add_signals(struct service_ctx *svc)
{
	svc->sigterm = evsignal_new(svc->base, SIGTERM, on_signal, svc);
	svc->sigint = evsignal_new(svc->base, SIGINT, on_signal, svc);
	if (!svc->sigterm || !svc->sigint) {
		fprintf(stderr, "%s: out of memory\n", svc->def->name);
		return 1;
	}
	evsignal_add(svc->sigterm, NULL);
	evsignal_add(svc->sigint, NULL);
	return 0;
}

int service_run(int argc, char **argv, const struct service_def *def, struct service_ctx *svc)
{
	int rc = open_common(argc, argv, def, svc);

	if (rc >= 0)
		goto done;
	rc = def->start(svc);
	if (rc == 0)
		rc = add_signals(svc);
	/* After every setting is checked (a bad one is the single line on stderr). */
	if (rc == 0)
		rc = def->check_event_store
			     ? service_check_event_store(def->name, &svc->cfg, &svc->log)
			     : -1;
	if (rc < 0)
		rc = event_base_dispatch(svc->base) < 0 ? 1 : 0;
	def->stop(svc);
done:
	if (svc->sigterm)
		event_free(svc->sigterm);
	if (svc->sigint)
		event_free(svc->sigint);
	tokens_close(&svc->tokens);
	metrics_close(&svc->metrics);
	if (svc->base)
		event_base_free(svc->base);
	return rc;
}
