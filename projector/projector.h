/* daybook-projector: the process context and the projection steps. */
#ifndef DAYBOOK_PROJECTOR_H
#define DAYBOOK_PROJECTOR_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "config.h"
#include "http.h"
#include "lease.h"
#include "ledger.h"
#include "ledger_json.h"
#include "log.h"
#include "metrics.h"
#include "pg.h"
#include "readmodel.h"
#include "redis.h"
#include "service.h"
#include "strmap.h"

/* Events a batch reads at most, and the pages of a Redis resync (accounts with their
 * statements; transfers). Literals in the statements (statements.c, READMODEL_TEXT). */
#define PROJECTOR_BATCH_MAX 2000
#define PROJECTOR_SYNC_ACCOUNTS_PAGE 200
#define PROJECTOR_SYNC_TRANSFERS_PAGE 1000
/* The projection this process maintains: its checkpoint row and its lease row. */
#define PROJECTOR_PROJECTION "sql"
/* Named conditions of projector_checkpoint_move (sql/010): another process took the
 * lease (this one is deposed), or the checkpoint is not where the batch started. */
#define PROJECTOR_SQLSTATE_FENCED "DBF01"
#define PROJECTOR_SQLSTATE_CHECKPOINT_MOVED "DBC01"

struct fold_rows;

/* A statement item (version > 0) or a transfer (version 0) for Redis. */
struct projector_item {
	char id[LEDGER_ID_MAX + 1]; /* account id, or transfer id */
	int32_t version;
	size_t json_at, json_len; /* where its JSON is in the batch's text */
	const char *json;         /* the JSON, once the batch is folded (the batch's rows own it) */
};

enum redis_sync { RS_UNKNOWN, RS_UNSYNCED, RS_SYNCING, RS_LIVE };

/* What Redis sync reports to the step machine through its completion callback: the
 * Redis step or resync it was given is over, or it wants a step (Redis came back, or
 * its live generation looks changed). */
enum redis_report { REDIS_STEP_DONE, REDIS_WANTS_STEP };

/* An account as the SQL read model holds it: the shared fold's row and its times. */
struct rm_account {
	struct readmodel_row row; /* the shared fold's row, and its times */
	char opened_at[32], updated_at[32];
	bool touched; /* changed by the batch in progress */
};

/* One currency's totals; the sum of balances may exceed int64. */
struct rm_total {
	struct readmodel_totals tot;  /* as committed */
	struct readmodel_count delta; /* the batch's change */
	bool touched;
};

/* An event as read from the log; data is parsed, strings are owned. */
struct log_event {
	char txid[24];
	long long position;
	char account[LEDGER_ID_MAX + 1];
	int32_t version;
	enum ledger_event_type type;
	char *data; /* the data's JSON text: data_in, or allocated when longer */
	size_t data_len;
	char data_in[200];
	int64_t at_us; /* recorded_at: microseconds since 2000-01-01 UTC (PostgreSQL's) */
	char at[32];   /* the same as the read models write it (readmodel_time_text) */
	/* Its account in the cache, when the step's lookups found it there (queue_lookups);
	 * valid for that step only, as the cache is dropped only between steps. */
	struct rm_account *acct;
};

enum projector_role { ROLE_ELECTING, ROLE_STANDBY, ROLE_LEADER };
enum projector_step {
	STEP_IDLE,
	STEP_READING,
	STEP_LOADING,
	STEP_WRITING,
	STEP_REDIS,   /* the batch's Redis writes are in flight */
	STEP_SYNCING, /* copying the SQL read models into a new Redis generation */
	STEP_BLOCKED, /* waiting for the retry timer */
	STEP_AHEAD,   /* the step is over; waiting for its read ahead to end */
};

/* What a failed batch transaction leads to (step.c): none, start over after the fault
 * pause, step down (fenced), or reload the checkpoint a rebuild's switch moved. */
enum write_failure { WRITE_OK = 0, WRITE_FAILED, WRITE_FENCED, WRITE_CP_MOVED };

struct projector_ctx {
	SERVICE_CTX_HEAD; /* cfg, log, base, metrics, http, stopping (shared/service.h) */
	struct pg *pg;
	struct redis *redis;
	enum redis_sync rsync;
	long long gen; /* the Redis generation this projector writes */
	/* The sweep of generations older than the live one (redis_sync.c): the live one
	 * when the sweep in flight started (0: none in flight), and when the last one that
	 * ran to the end started (0: none since we took the lead or (re)connected); the one
	 * generation the sweep in flight looks for (0: every one). */
	long long sweep_gen, swept_gen, sweep_only;
	/* A CLEAN_OLD of the sweep in flight failed (it is owed again); the last page's
	 * CLEAN_OLD is in flight and its reply ends the sweep. */
	bool sweep_failed, sweep_closing;
	/* The one generation the sweep looks for is ours (or has no identity left): its
	 * pages go straight to UNLINK, not through CLEAN_OLD. */
	bool sweep_direct;
	size_t rpending;                 /* Redis replies still to come for the resync's phase */
	bool rfailed;                    /* a reply of the resync's phase failed */
	size_t rerrors;                  /* error replies of the current step */
	struct metric *m_redis_failures; /* Redis steps abandoned on an error reply */
	/* What the live Redis generation has reached, and since when it trails the SQL
	 * checkpoint (wall clock; 0: it does not), for the Redis lag metrics. */
	long long redis_pos;
	time_t redis_behind_since;
	const char *resync_reason; /* why Redis is unsynced (a static label), for the resync count */
	struct metric *m_redis_position, *m_redis_lag_events, *m_redis_lag_seconds;
	struct metric *m_commit_seconds; /* the SQL batch's transaction, sent to committed */
	struct timespec write_start;
	unsigned rfail_streak; /* Redis steps failed in a row: the pause before a resync grows */
	bool live_suspect;     /* the periodic check saw another live generation mid-batch */
	bool cp_reloaded;      /* the last batch found the checkpoint moved and reloaded it */
	unsigned polls;        /* poll ticks, for the slower Redis check */
	unsigned next_sync;    /* no resync before this tick (after a failed one) */
	struct sync_state *sync;
	/* Redis sync's completion callback, set by projector_redis_open. */
	void (*redis_report)(struct projector_ctx *ctx, enum redis_report what);
	/* The event store's identity (READMODEL_IDENTITY_SQL), "" until read. Read again
	 * before Redis is checked or copied, and after every new PostgreSQL session
	 * (identity_stale) before a batch writes Redis: the database may be another. */
	char identity[READMODEL_IDENTITY_MAX];
	bool identity_stale;
	int identity_next; /* what the identity read leads to (redis_dispatch.c) */
	/* Called when a rebuild moved the live generation under the batch on its way: sends
	 * it again (true) or not; set by redis_batch_send (redis_batch.c). */
	bool (*batch_moved)(struct projector_ctx *ctx);
	/* The last other store whose live generation our switch replaced, and whether it
	 * has since made its own live again (two deployments on one Redis database). */
	char foreign_last[READMODEL_IDENTITY_MAX];
	bool foreign_fight;
	struct event *poll_timer, *retry_timer;
	struct lease *lease;
	enum projector_role role;
	long long epoch;       /* the epoch of our current (or last) term: fences every write */
	long long write_epoch; /* the epoch the batch in progress was written with */
	bool cp_stale;         /* leadership changed mid-step: reload the checkpoint when idle */
	enum projector_step step;
	bool again; /* woken while busy: read again when done */
	/* Checkpoint of the SQL read models: (txid, position) of the last applied event. */
	char cp_txid[24];
	long long cp_pos;
	char cp_gen[24];     /* the tables' generation: a rebuild's swap bumps it */
	char batch_from[48]; /* the checkpoint token before the batch in progress */
	char batch_to[48];   /* and after it (its last event), the token its PUT_BATCH writes */
	long long batch_to_pos;
	/* The batch's Redis leg: not sent, in flight, or over. It goes out together with the
	 * SQL transaction when Redis is live and known (step.c, fold_and_write), else after
	 * the commit; the step ends when both legs have. */
	enum { REDIS_LEG_NONE, REDIS_LEG_SENT, REDIS_LEG_OVER } redis_leg;
	/* The SQL transaction failed while the Redis leg was in flight: what to do once it
	 * is over (step.c, write_failed), and the reason. */
	enum write_failure write_held;
	char write_why[256];
	/* The generation this projector's last PUT_BATCH landed in, and the checkpoint it
	 * wrote there (put_sent: the one the batch in flight writes). */
	long long put_gen;
	char put_to[48], put_sent[48];
	double lag_seconds;
	/* A live Redis generation ahead of SQL, whose checkpoint is looked up in the log
	 * before it is adopted (redis_sync.c, status_reply) or, when a batch followed it,
	 * before the next batch (ahead_unverified; redis_batch.c, redis_dispatch.c). */
	long long ahead_gen;
	char ahead_token[48];
	bool ahead_adopt, ahead_unverified, ahead_checking;
	/* Redis sessions so far (each on_ready), and the one a check of the log began in. */
	unsigned long redis_sessions, ahead_session;
	/* Caches of the SQL read models, valid while leading (cleared on any doubt). */
	struct strmap *accounts; /* id -> struct rm_account */
	struct strmap *totals;   /* currency -> struct rm_total */
	bool totals_loaded;
	/* The batch in progress. */
	struct log_event *events;
	size_t nevents;
	/* The next batch, read while the last one's Redis leg was in flight (step.c, read
	 * ahead): from checkpoint ahead_from, the log's head then ahead_head. */
	struct log_event *ahead; /* PROJECTOR_BATCH_MAX, allocated on first use */
	size_t nahead;
	long long ahead_head;
	char ahead_from[48];
	bool ahead_running, ahead_ready;
	struct fold_rows *rows;
	/* The position NOTIFY's own connection (step.c, notify): the newest committed
	 * checkpoint not yet announced, the one in flight (sent again if it fails), and whether
	 * a NOTIFY is in flight. */
	struct pg *notify_pg;
	char notify_token[64], notify_sent[64];
	bool notify_running;
	/* The lag past the reader's horizon, or while no read comes back (step.c, lag
	 * beyond): whether the last read found nothing; the look past the horizon in flight
	 * on the notify connection; what it found after checkpoint beyond_cp: the oldest
	 * committed event's recorded_at (Unix µs; 0 for none) and the log's head. */
	bool read_empty, beyond_running;
	time_t read_at, beyond_sent; /* when the last read came back; the last look went out */
	char beyond_cp[48];
	long long beyond_at_us, beyond_head;
	struct metric *m_position, *m_lag_events, *m_lag_seconds, *m_batch, *m_errors, *m_leader,
		*m_applied, *m_epoch, *m_read_ahead;
};

/* The step machine (step.c). */
/* Begin a step if idle and leading; otherwise remember to. */
void projector_wake(struct projector_ctx *ctx);
/* Redis sync's report (projector_redis_open's callback): the Redis step is over, or
 * it wants a step. */
void projector_redis_reported(struct projector_ctx *ctx, enum redis_report what);
/* Drop every cache: the next batch reloads what it needs. */
void projector_forget(struct projector_ctx *ctx);
/* Free the batch in progress (its events and rows). */
void projector_free_events(struct projector_ctx *ctx);
/* Forget the batch read ahead (its events; the array stays). */
void projector_drop_ahead(struct projector_ctx *ctx);
/* While reads find nothing, look past the reader's horizon now and then (on_poll). */
void projector_look_beyond(struct projector_ctx *ctx);
/* The lease named us (epoch > 0) or deposed us (epoch 0): lease_config.on_change. */
void projector_on_lease_change(void *arg, long long epoch, const char *why);
/* The retry timer fired: a blocked step may start again. */
void projector_retry(struct projector_ctx *ctx);
/* A new PostgreSQL session: pg_config.on_connect. */
void projector_on_pg_connect(void *arg);
/* The notifying connection is new (its pg_config.on_connect): announce what waits. */
void projector_on_notify_connect(void *arg);
/* The statement the notifying connection prepares. */
const struct pg_statement *projector_notify_statements(size_t *n);
/* The statements the projector prepares on each connection. */
const struct pg_statement *projector_statements(size_t *n);
/* Fold the batch into the caches and queue the SQL writes; false on a corrupt log. */
bool projector_fold(struct projector_ctx *ctx) __attribute__((warn_unused_result));
bool projector_queue_writes(struct projector_ctx *ctx) __attribute__((warn_unused_result));
/* The batch committed: fold its deltas into the cached totals. */
void projector_rows_committed(struct projector_ctx *ctx);
/* Forget the batch's rows (clears the touched marks). */
void projector_rows_free(struct fold_rows **rows);
/* The batch's touched accounts and Redis items. */
size_t projector_rows_accounts(const struct fold_rows *r, struct rm_account *const **out);
size_t projector_rows_items(const struct fold_rows *r, const struct projector_item **out);
/* GET /accounts/{id}'s body for an account, appended to text: its offset there, or
 * (size_t)-1 (readmodel_account_json_append). */
size_t projector_account_json_append(struct readmodel_text *text, const struct rm_account *a);

/* Redis side (redis_dispatch.c: the batch and maintain decisions; redis_sync.c: the
 * rest). It reports to the step machine through `report` only. */
int projector_redis_open(struct projector_ctx *ctx,
			 void (*report)(struct projector_ctx *ctx, enum redis_report what))
	__attribute__((warn_unused_result));
/* Send the committed batch to the live generation; false when there is nothing to
 * wait for (Redis not live: a later resync covers the batch). */
bool projector_redis_batch(struct projector_ctx *ctx);
/* Send the folded batch before its SQL transaction has committed, when Redis is live,
 * connected and its store's identity known (then the script's checks are all it needs):
 * ctx->redis_leg becomes REDIS_LEG_SENT (true; its reply ends the leg with
 * REDIS_STEP_DONE), or REDIS_LEG_OVER when the send failed (reported). Otherwise nothing
 * is sent or changed (false, the leg stays REDIS_LEG_NONE): it goes after the commit. */
bool projector_redis_batch_early(struct projector_ctx *ctx);
/* When leading and idle: resync Redis if it needs it; true when a resync started. */
bool projector_redis_maintain(struct projector_ctx *ctx);
void projector_redis_tick(struct projector_ctx *ctx);
/* A new term: raise Redis's leader epoch to ours before anything else is written (the
 * write scripts raise it too, and refuse writes of an older epoch). */
void projector_redis_fence(struct projector_ctx *ctx);

/* A new PostgreSQL session: the store's identity is read again before Redis is written. */
void projector_redis_session(struct projector_ctx *ctx);

#endif
