/* What every service binary shares: the head of its context, and main() from the
 * command line to the last teardown (service_run). */
#ifndef DAYBOOK_SERVICE_H
#define DAYBOOK_SERVICE_H

#include <stdbool.h>

#include "config.h"
#include "log.h"

struct event;
struct event_base;
struct http_server;
struct metrics;
struct tokens;
struct service_def;

/* The members every service's context starts with. service_run fills in the first
 * five and `def`, and owns them (and the signal events); `http` is the service's own,
 * closed by its `stop`, but service_run stops it accepting on the first signal. */
#define SERVICE_CTX_MEMBERS                                                                        \
	struct config cfg;                                                                         \
	struct log log;                                                                            \
	struct event_base *base;                                                                   \
	struct metrics *metrics;                                                                   \
	struct tokens *tokens; /* with CONFIG_NEED_TOKENS, else NULL */                            \
	struct http_server *http;                                                                  \
	struct event *sigterm, *sigint;                                                            \
	bool stopping; /* a signal came: finish what is in flight, take nothing new */             \
	const struct service_def *def;

struct service_ctx {
	SERVICE_CTX_MEMBERS
};

/* The first member of every service's context (struct command_ctx, ...): the common
 * members by their names (ctx->log, ctx->base, ...) and, over the same bytes, all of
 * them as one struct service_ctx (ctx->svc) to hand to service_run. A callback given
 * a struct service_ctx * converts it back with SERVICE_CTX_OF. */
#define SERVICE_CTX_HEAD                                                                           \
	union {                                                                                    \
		struct service_ctx svc;                                                            \
		struct {                                                                           \
			SERVICE_CTX_MEMBERS                                                        \
		};                                                                                 \
	}

/* The service's context around `svc`, which must be its `svc` member (at offset 0). */
#define SERVICE_CTX_OF(type, svc) ((type *)(void *)(svc))

/* One service: its names, its settings, and what it does at each stage. */
struct service_def {
	const char *name;           /* "daybook-command": on stderr and --version */
	const char *log_name;       /* "command": the service of each log line */
	const char *usage;          /* --help */
	unsigned need;              /* CONFIG_NEED_*; CONFIG_NEED_TOKENS opens svc->tokens */
	const char *default_listen; /* as for config_load */
	bool check_event_store;     /* refuse a restored event store (service_check_event_store) */
	const char *stopping;       /* logged after "signal N: " on the first SIGTERM/SIGINT */
	/* Optional: the service's own settings, after the configuration and before
	 * anything opens (evthread_use_pthreads belongs here). -1 to go on, else the exit
	 * status (after one line on stderr). */
	int (*configure)(struct service_ctx *svc);
	/* Open what the service needs on svc->base: 0, or the exit status after one line
	 * on stderr. */
	int (*start)(struct service_ctx *svc);
	/* The first SIGTERM or SIGINT, once svc->stopping is set and svc->http takes no
	 * more connections: finish what is in flight, then leave the loop. */
	void (*on_stop)(struct service_ctx *svc);
	/* Close what configure and start opened, also after a start that failed halfway
	 * (everything not yet opened is NULL). */
	void (*stop)(struct service_ctx *svc);
};

/* main() of a service: service_init; the log level; svc->tokens (with
 * CONFIG_NEED_TOKENS; a bad file is exit 2), the event base and the metrics; `start`;
 * SIGTERM and SIGINT on the loop; service_check_event_store when asked; the loop until
 * it exits; `stop`; then what service_run opened is closed. svc must be zeroed (but
 * for what `configure` expects) and be the `svc` member of the service's context.
 * Returns the exit status. */
int service_run(int argc, char **argv, const struct service_def *def, struct service_ctx *svc)
	__attribute__((warn_unused_result));

/* A service's event loop. On epoll, with libevent's change list: adding and removing an
 * fd's interest within one turn of the loop (an HTTP answer's write readiness, on and
 * off again per request) costs one epoll_ctl at the next wait instead of one per
 * change (the read benchmark went from about 0.7x to 0.85x nginx: docs/performance.md,
 * "Read path budget"). Safe
 * here because no service dup()s a descriptor it watches (libevent's documented
 * limit); libevent retries a change whose fd was closed and reopened. NULL if out of
 * memory. */
struct event_base *service_event_base_new(void);

/* Parse the command line (getopt_long): --help/-h prints `usage` on stdout, --version/-V
 * the version (both exit 0, whatever the configuration); any other argument prints
 * `usage` on stderr (exit 2). Then load the configuration
 * (`need`, `default_listen` as for config_load), reporting a bad setting on stderr as
 * "<name>: ..." (exit 2); ignore SIGPIPE. Returns -1 when the service should go on,
 * else the exit status to return from main. */
int service_init(int argc, char **argv, const char *name, const char *usage, unsigned need,
		 const char *default_listen, struct config *cfg)
	__attribute__((warn_unused_result));

/* At start: refuse an event store whose txids this cluster has not reached (restored
 * from a logical dump into another cluster, see eventstore.h), with one line on stderr
 * ("<name>: ..."): returns EVENTSTORE_EXIT_UNUSABLE for main to return, else -1: go on.
 * When the check cannot run (PostgreSQL not reachable yet), logs a warning, returns -1,
 * and a background thread repeats the check every second until it gets an answer: on
 * a refusal it prints the same line and ends the process with that status. `name` and
 * cfg->pg must live as long as the process. */
int service_check_event_store(const char *name, const struct config *cfg, const struct log *log)
	__attribute__((warn_unused_result));

#endif
