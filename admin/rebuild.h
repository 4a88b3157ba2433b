/* daybook-admin rebuild: what its rooms share (the state of one run, its limits, and
 * the functions one room calls in another). Internal to admin/rebuild*.c. */
#ifndef DAYBOOK_ADMIN_REBUILD_H
#define DAYBOOK_ADMIN_REBUILD_H

#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "admin.h"
#include "copy.h"
#include "ledger.h"
#include "ledger_json.h"
#include "pg.h"
#include "readmodel.h"
#include "strmap.h"

#define CHUNK 20000                /* events per read in reader order, and per committed chunk */
#define BULK_BLOCKS 500            /* heap blocks per read of the bulk (some 20,000 events) */
#define ACCOUNT_ROWS_MAX (8 << 20) /* bytes of account rows buffered before a COPY */
#define XFER_IDS_MAX (64 << 20)    /* bytes of transfer ids kept to delete the old keys by */
#define REDIS_FLUSH 20000          /* pipelined Redis commands before reading replies */
#define RESP_WRITE (256 << 10)     /* bytes of commands buffered before they are written */
#define RUN_ID_LEN 48              /* a Redis run_id (40 hex digits) and a NUL */
#define HELD_MAX 200000            /* default DAYBOOK_REBUILD_HELD_MAX */
/* Advisory lock key, held at session level by a running rebuild from before it resets
 * the shadow tables to its end (or its death): one rebuild of a database at a time. */
#define REBUILD_LOCK "1685551460"
#define SWITCH_LOCK_WAIT "200ms" /* longest wait for a switch lock in one attempt */
#define SWITCH_RETRY_US 500000   /* pause between attempts */

/* The one piece of process-wide state: set by the signal handler (rebuild.c), read by
 * the loop (rebuild_conn.c owns it). */
extern volatile sig_atomic_t rb_interrupted;

struct acct {
	struct readmodel_row row;       /* the shared fold's */
	struct readmodel_totals *total; /* its currency's, once looked up (rb->totals owns it) */
	int64_t opened_at, updated_at;  /* PostgreSQL timestamptz: µs since 2000-01-01 UTC */
	int32_t expected;      /* statement items the log had when counted (a lower bound) */
	int32_t at_cp;         /* items folded at or below the hints' checkpoint */
	int32_t sent;          /* statement items sent to Redis */
	int32_t written;       /* the version last written to the shadow models (0: none) */
	bool listed;           /* in rb->holders */
	struct stashed *stash; /* events read before their predecessor, by version */
	int32_t npending;      /* items waiting to go in one LPUSH with the account's next ones */
	char **pending;        /* their JSON (owned), READMODEL_ITEMS_KEPT slots once needed */
};

/* An event as a read of the log gives it; data is its JSON text, not NUL-terminated. */
struct logged {
	int64_t position, at;
	uint64_t txid;
	int32_t version;
	enum ledger_event_type type;
	const char *data;
	size_t len;
};

/* An event read before its stream's previous one (the heap does not keep streams in
 * order), waiting for it. */
struct stashed {
	struct stashed *next;
	struct logged ev;
	char text[]; /* ev.data */
};

/* Redis switches inside the SQL transaction, so that no projector batch lands in
 * between; if that transaction then does not commit, Redis's live pointer is put back
 * as it was, if it still names our generation (rebuild_switch.c). */
enum live_switch {
	LIVE_UNTOUCHED, /* the switch was not sent, or refused */
	LIVE_SWITCHED,  /* the pointer went to our generation */
	LIVE_UNKNOWN,   /* sent, but its reply was lost */
};
struct live_before {
	enum live_switch state;
	bool present; /* the switch replaced a pointer (gen), else there was none */
	char gen[32];
};

struct rebuild {
	struct admin_ctx *ctx;
	PGconn *pg; /* reads the log; its next read runs while the writer works */
	PGconn *wr; /* writes the shadow tables and runs the switch */
	struct copier copier;
	bool read_pending; /* a read of the next chunk was sent on pg */
	redisContext *redis;
	bool sql, want_redis;
	long long gen;
	char identity[READMODEL_IDENTITY_MAX]; /* the store's, which our generation records */
	char redis_run_id[RUN_ID_LEN];  /* the server's, to know it again after a reconnect */
	struct live_before live_before; /* the live pointer as the switch found it */
	bool live_touched; /* a failed switch left the live pointer other than it found it */
	bool locked;       /* holds REBUILD_LOCK: the shadow tables and generation are ours */
	uint64_t cp_txid;  /* the checkpoint: the last event applied in reader order */
	long long position;
	char bulk_xmin[24]; /* the bulk is every event below this, read in heap order */
	long long bulk_blocks, bulk_next;
	bool bulk_read;     /* the pending read is one of the bulk */
	long long stashed;  /* events waiting for their predecessors */
	bool hinted;        /* expected comes from the live models, checked by at_cp */
	uint64_t hint_txid; /* the live models' checkpoint */
	long long hint_pos;
	struct strmap *accounts, *totals;
	struct ledger_event_buf data; /* the decoded event's strings */
	struct copy_buf entries;      /* binary COPY data of the chunk */
	struct copy_buf xfer_ids; /* every transfer id folded, NUL-separated; p NULL past the cap */
	bool xfer_ids_full;
	long long held, held_max; /* statement items held for Redis, all accounts */
	struct acct **holders;    /* accounts that have held items since the last send_held */
	size_t nholders, holders_cap;
	size_t redis_unwritten; /* about the bytes of commands hiredis has not written yet */
	size_t redis_queued;    /* commands sent whose replies are not read yet */
	size_t redis_prev;      /* of those, the ones sent before the current chunk */
	long long done, total;
	double started, last_report;
	double loaded, indexed, switched; /* when each phase ended, for the summary */
	bool tty; /* stderr is a terminal: a progress bar and text; else JSON lines */
	const char *phase;
	char error[2048]; /* the first error, for the final line */
	int failure;      /* the exit status if it fails: CLI_EXIT_PROBLEM unless a
			    * dependency was unavailable (CLI_EXIT_UNAVAILABLE) */
};

/* The rooms, in layers: a room calls only rooms below it, never one above it or beside it.
 *   rebuild.c           the command: prepares, loads, indexes, switches, cleans up
 *   rebuild_switch.c    the switch protocol; uses end and read (to catch up)
 *   rebuild_read.c      reading the log in chunks; uses fold
 *   rebuild_end.c       the end state and the keys; uses fold
 *   rebuild_gc.c        clean-up of old generations
 *   rebuild_fold.c      the fold; uses the Redis pipeline
 *   rebuild_redis.c     the Redis pipeline
 *   rebuild_conn.c      PostgreSQL helpers and the interrupt flag
 *   rebuild_progress.c  progress and messages; uses none
 * read, end and gc are one layer: none of them calls another. Every room may call the
 * rooms below its layer (conn and progress from anywhere but progress). */

/* progress and messages (rebuild_progress.c) */
void rb_json_line(json_t *obj);
__attribute__((format(printf, 2, 3))) void rb_error(struct rebuild *rb, const char *fmt, ...);
__attribute__((format(printf, 2, 3))) void rb_note(struct rebuild *rb, const char *fmt, ...);
double rb_now(void);
void rb_report(struct rebuild *rb, bool final);

/* PostgreSQL helpers (rebuild_conn.c) */
bool rb_exec(struct rebuild *rb, PGconn *pg, const char *sql);
void rb_await_answer(struct rebuild *rb, PGconn *pg, bool abort);
bool rb_sent_ok(struct rebuild *rb, PGconn *pg, const char *what, bool abort);

/* the Redis pipeline (rebuild_redis.c) */
bool rb_redis_drain_n(struct rebuild *rb, size_t n);
bool rb_redis_drain(struct rebuild *rb);
bool rb_redis_write_out(struct rebuild *rb);
bool rb_redis_send(struct rebuild *rb, int argc, const char **argv);
void rb_key(const struct rebuild *rb, char *out, size_t len, const char *kind, const char *id);
bool rb_redis_usable(struct rebuild *rb);
bool rb_connect_redis(struct rebuild *rb);

/* reading the log in chunks (rebuild_read.c) */
bool rb_fold_chunk(struct rebuild *rb, int *n);
bool rb_load(struct rebuild *rb);
void rb_choose_count(struct rebuild *rb);
bool rb_send_count(struct rebuild *rb);
bool rb_take_count(struct rebuild *rb);
bool rb_bulk_bounds(struct rebuild *rb);

/* the fold (rebuild_fold.c) */
bool rb_send_items(struct rebuild *rb, struct acct *a);
bool rb_hold_item(struct rebuild *rb, struct acct *a, char *json);
void rb_acct_free(void *value);
bool rb_fold_row(struct rebuild *rb, PGresult *r, int i);
bool rb_finish_items(struct rebuild *rb, struct acct *a);
bool rb_send_held(struct rebuild *rb);

/* the end state: accounts, totals, keys (rebuild_end.c) */
bool rb_write_end_state(struct rebuild *rb, const char *token);
bool rb_repair_items(struct rebuild *rb);
bool rb_index_and_send(struct rebuild *rb);

/* the switch protocol (rebuild_switch.c) */
bool rb_switch_over(struct rebuild *rb);

/* clean-up of old generations (rebuild_gc.c) */
void rb_redis_cleanup(struct rebuild *rb, long long keep, long long drop);
/* After the switch: the old generations are deleted here (true), or left to the
 * leading projector's sweep (false). */
bool rb_cleanup_after_switch(struct rebuild *rb);

#endif
