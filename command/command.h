/* daybook-command: the process context, commands, and the group-commit batcher. */
#ifndef DAYBOOK_COMMAND_H
#define DAYBOOK_COMMAND_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

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
	long long epoch;   /* the epoch of our current term, 0 when not leading */
	bool standing_by;  /* the lease answered: another instance holds it */
	struct metric *m_leader, *m_epoch;
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

enum cmd_kind { CMD_OPEN, CMD_DEPOSIT, CMD_WITHDRAW, CMD_TRANSFER, CMD_CLOSE };

/* One write request on its way through the batcher. Strings in `u` borrow from
 * `body`, which the command owns. */
struct cmd {
	struct cmd *next;
	struct http_request *req;
	enum cmd_kind kind;
	json_t *body; /* NULL for an empty close body */
	union {
		struct ledger_open_body open;
		struct ledger_money_body money;
		struct ledger_transfer_body transfer;
	} u;
	char account[LEDGER_ID_MAX + 1]; /* the account a path names */
	int32_t expected_version;        /* If-Match, -1 when absent */
	const char *token_id;
	char request_id[129];
	char idem_key[256];              /* "" when the request has none */
	char idem_hash[DIGEST_SHA256_HEX_LEN + 1];
	char time[32];                   /* ISO 8601 UTC, for event metadata */
	int attempts;                    /* write attempts after conflicts */
	bool solo;                       /* retry alone after a batch conflict */
};

/* Start the batcher on ctx's connection and cache. */
int batcher_open(struct batcher **out, struct command_ctx *ctx) __attribute__((warn_unused_result));
void batcher_close(struct batcher **b);
/* Take ownership of cmd: it is answered (and freed) when decided and committed. */
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

/* Free a command (and its body) without answering it. */
void cmd_free(struct cmd *cmd);

/* The HTTP routes of the write API. */
extern const struct http_route command_routes[];
extern const size_t command_nroutes;

#endif
