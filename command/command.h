/* daybook-command: the process context, the group-commit batcher's interface, and the
 * idempotency sweep. */
#ifndef DAYBOOK_COMMAND_H
#define DAYBOOK_COMMAND_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "cmd.h"
#include "config.h"
#include "digest.h"
#include "http.h"
#include "lease.h"
#include "ledger.h"
#include "ledger_json.h"
#include "log.h"
#include "metrics.h"
#include "pg.h"
#include "service.h"
#include "strmap.h"
#include "tokens.h"

struct batcher;
struct sweeper;

/* Idempotency record expiry (command/sweep.c). */
struct sweep_settings {
	long retention_s; /* DAYBOOK_IDEMPOTENCY_RETENTION_S: records older than this go */
	long interval_s;  /* DAYBOOK_IDEMPOTENCY_SWEEP_INTERVAL_S: between sweeps */
};

struct command_ctx {
	SERVICE_CTX_HEAD; /* cfg, log, base, metrics, tokens, http, stopping (shared/service.h) */
	struct pg *pg;
	struct batcher *batcher;
	struct sweeper *sweeper;
	struct sweep_settings sweep;
	double write_timeout;     /* DAYBOOK_WRITE_TIMEOUT_MS, in seconds */
	int statement_timeout_ms; /* DAYBOOK_STATEMENT_TIMEOUT_MS */
	struct event *drain_timer;
	/* Leadership of the write side (shared/lease.h, sql/012): only the holder of the
	 * write lease appends; every batch is fenced by the epoch of its term. */
	struct lease *lease;
	long long epoch;  /* the epoch of our current term, 0 when not leading */
	bool standing_by; /* the lease answered: another instance holds it */
	struct metric *m_leader, *m_epoch;
	/* The commands' time of this second, "YYYY-MM-DDTHH:MM:SS", formatted once a
	 * second (cmd.c). */
	long long time_at;
	char time_second[24];
	/* Answered commands kept for the next requests (cmd.c). */
	struct cmd *spare_cmds;
	size_t nspare_cmds;
};

/* The write lease's name (its row in command_leases) and the fence's named condition:
 * command_fence (sql/012) raises it when a batch's epoch is no longer the lease's. */
#define COMMAND_LEASE_NAME "command"
#define COMMAND_SQLSTATE_FENCED "DBF01"

/* A new term (epoch > 0) or its end (epoch 0, why says how): called by the lease, and
 * by the batcher when a batch finds itself fenced. Either way every cached account
 * state is dropped (another leader may have written), and on a term's end every
 * queued command is answered 503 not_leader. */
void command_leadership(struct command_ctx *ctx, long long epoch, const char *why);

/* How the batcher reports back; it never speaks HTTP itself. */
struct batcher_hooks {
	/* A command's outcome: answer it and free it (cmd_settle). Steals out's body
	 * and headers. */
	void (*settle)(void *arg, struct cmd *cmd, struct cmd_outcome *out);
	/* Free a command that will not be answered: the batcher closes (cmd_drop). */
	void (*drop)(void *arg, struct cmd *cmd);
	/* A batch of the current term was fenced (sql/012): another instance took the
	 * write lease, nothing of the batch was written; stand by. */
	void (*fenced)(void *arg, const char *why);
	void *arg;
};

/* Start the batcher on ctx's connection and cache, reporting through hooks (copied). */
int batcher_open(struct batcher **out, struct command_ctx *ctx, const struct batcher_hooks *hooks)
	__attribute__((warn_unused_result));
void batcher_close(struct batcher **b);
/* Take ownership of cmd: its outcome goes to hooks->settle once decided and committed
 * (or at once, when it cannot be queued). */
void batcher_submit(struct batcher *b, struct cmd *cmd);
/* PostgreSQL became ready: resume. */
void batcher_kick(struct batcher *b);
/* A new PostgreSQL session: forget the account cache (the database may be another
 * one now), then resume. */
void batcher_reconnected(struct batcher *b);
/* Nothing queued or in flight. */
bool batcher_idle(const struct batcher *b);
/* Leadership changed: forget every cached account state (the next batch reads the log);
 * when leading no more, answer every queued command 503 not_leader. A batch in flight
 * finishes on its own: its fence decides whether it commits. */
void batcher_leadership(struct batcher *b, bool leading);

/* Read the sweep's settings from the environment. False with one line naming the
 * variable in err (the binary then exits 2). */
bool sweep_settings_load(struct sweep_settings *out, char *err, size_t errlen)
	__attribute__((warn_unused_result));
/* Expire idempotency records past ctx->sweep.retention_s, a small batch per short
 * transaction, on a PostgreSQL connection of its own (never the write path's): at
 * once when it connects, then every ctx->sweep.interval_s. Close with sweeper_close. */
int sweeper_open(struct sweeper **out, struct command_ctx *ctx) __attribute__((warn_unused_result));
void sweeper_close(struct sweeper **s);

/* The statements the batcher prepares on each connection. */
const struct pg_statement *command_statements(size_t *n);

#endif
