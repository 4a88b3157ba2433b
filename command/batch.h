/* The group-commit batcher's rooms share this: the batch in flight, and what each room
 * (batcher.c, load.c, decide.c, append.c, idem.c) gives the queue in batcher.c. Only
 * batcher.c calls the others; they call none of each other's stages.
 *
 * Group commit: concurrent commands are decided together against one state and
 * appended in one PostgreSQL transaction (one round trip, one fsync), and each is
 * answered only once that transaction has committed.
 *
 * A batch goes through two pipelines on the service's single connection:
 *   load  - fold the streams the cache lacks, find stored idempotency records and
 *           used transfer ids (skipped when nothing is missing)         (load.c, idem.c);
 *   write - INSERT every event and idempotency record; the pipeline's sync commits
 *           them as one implicit transaction, or rolls all of them back (append.c).
 *           A batch that writes nothing (replays, refusals) still commits one (its
 *           fence alone), so that no answer rests on a record the synchronous
 *           standby may lack (batcher.c, write_batch).
 * Decisions run in memory against a batch-local overlay of the account cache, so a
 * command that a rule refuses refuses only itself (decide.c). Should the write fail
 * anyway (a concurrent writer elsewhere took a version or a transfer id), nothing was
 * written: the batch's commands are retried one by one from fresh state, so one
 * command's conflict never fails another (batcher.c).
 *
 * Only the leader writes (command_leadership, sql/012): a batch takes the epoch of the
 * term it starts in, and its write pipeline ends with command_fence(epoch), so a batch
 * of a deposed leader rolls back (SQLSTATE DBF01) instead of committing; its commands
 * get 503 not_leader, and the instance stands by. A batch whose term ended while it
 * was in flight puts nothing into the cache. */
#ifndef DAYBOOK_BATCH_H
#define DAYBOOK_BATCH_H

#include <libpq-fe.h>
#include <time.h>

#include "command.h"

struct evbuffer;

#define BATCH_MAX 256
#define PENDING_MAX 20000
#define CACHE_MAX 200000
#define MAX_ATTEMPTS 3
/* Stands for an event's log position in a response body until the log assigns it. */
#define POSITION_PLACEHOLDER "?"
/* An account's state is snapshotted at every multiple of this version, so that
 * loading it reads at most this many events after its newest snapshot. */
#define SNAPSHOT_EVERY 1000

/* A command's outcome within the batch. */
struct slot {
	struct cmd *cmd;
	int status;      /* 0 while undecided */
	json_t *body;    /* the response body, owned */
	json_t *headers; /* {"ETag": ..., "Location": ...}, owned */
	bool replay;     /* answered from a stored record */
	bool unrecorded; /* an outcome that must not be stored (a key reused) */
	int last_event;  /* index of its last event in the batch, -1 for none */
	/* A success decided in this batch is answered from text in b->text instead of
	 * body and headers (NULL then): its body up to the value of "position" (ok_len
	 * bytes at ok_body, with room after them for the rest: slot_body), its ETag and
	 * Location (offsets of NUL-terminated values; 0 when absent, as the text never
	 * starts with one). */
	bool text;
	size_t ok_body, ok_len, etag, location;
};

struct pending_event {
	char stream[LEDGER_ID_MAX + 16];
	char version[12];
	const char *type;
	size_t data, metadata; /* offsets of their JSON texts (NUL-terminated) in b->text */
	char *snapshot;        /* the account's state after this event, or NULL; owned */
	int slot;
};

enum batch_state { B_IDLE, B_LOADING, B_WRITING };

struct batcher {
	struct command_ctx *ctx;
	struct batcher_hooks hooks;
	struct cmd *head, *tail; /* commands waiting for the next batch */
	size_t npending;
	struct strmap *cache; /* account id -> struct ledger_account, committed state */
	struct strmap
		*inflight; /* "token\x1fkey" -> the keyed command that owns it, until answered */
	enum batch_state state;
	/* The batch in flight. */
	long long epoch; /* the term it was started in: its fence */
	struct slot slots[BATCH_MAX];
	size_t nslots;
	struct pending_event events[2 * BATCH_MAX];
	size_t nevents;
	struct ledger_text text; /* the events' data and metadata texts, kept between batches */
	struct strmap *overlay;  /* account id -> struct ledger_account, this batch's view */
	struct ledger_account overlay_accounts[2 * BATCH_MAX]; /* the overlay's values */
	size_t noverlay;
	struct strmap *transfers; /* transfer ids already in the log or taken in this batch */
	struct strmap *refold;    /* account ids whose snapshot was refused: load them in full */
	struct strmap *catchup;   /* account id -> struct ledger_account loaded from more than
				   * SNAPSHOT_EVERY events: snapshot it with this batch's write */
	int q_streams, q_idem, q_transfers; /* result index of each load query, -1: not sent */
	struct metric *batch_size, *events_total, *replays, *conflicts, *unavailable, *fenced,
		*not_leader;
	struct metric *commit_seconds, *batch_events, *barriers;
	struct timespec write_start; /* when the batch's write transaction was sent */
};

/* --- load.c: what the batch needs from the log -------------------------------- */

/* Queue the lookups the batch needs (streams the cache lacks, stored records, used
 * transfer ids); *queued is how many. False when out of memory. */
bool load_queue(struct batcher *b, int *queued) __attribute__((warn_unused_result));
/* Queue the full reload of the streams whose snapshot was refused (b->refold), and
 * empty b->refold. False when out of memory. */
bool load_queue_refold(struct batcher *b) __attribute__((warn_unused_result));
/* Fold a load's results into the cache and the batch (records, transfer ids). False
 * when a stream cannot be folded (the log names it). */
bool load_apply(struct batcher *b, PGresult *const *results) __attribute__((warn_unused_result));

/* --- decide.c: the account cache and deciding ----------------------------------- */

/* A zeroed account with this id ("does not exist"); NULL when out of memory. */
struct ledger_account *account_new(const char *id);
/* An account's state as a snapshot stores it; caller frees. NULL when out of memory. */
char *account_state_text(const struct ledger_account *acc);
/* Start fetching the cache's entries for the batch's accounts, before a stage looks them
 * all up: with many accounts they are out of the CPU's caches at each stage (the stages
 * are a PostgreSQL round trip apart), and each look-up waited for two fetches in turn
 * (its bucket, then its entry). A hint only (strmap_prefetch). */
void cache_prefetch(struct batcher *b);
/* Every account id a command touches. */
size_t cmd_accounts(const struct cmd *cmd, const char *ids[2]);
/* Decide slot i; false when memory ran out (the batch must be abandoned). */
bool decide(struct batcher *b, int i) __attribute__((warn_unused_result));
/* A text slot's body with `position` in place ("position":"?" for the idempotency
 * record: POSITION_PLACEHOLDER), NUL-terminated, in b->text until the slot's next
 * slot_body; *len is its length. */
const char *slot_body(struct batcher *b, const struct slot *s, const char *position, size_t *len);
/* Forget cached state the batch may have changed. */
void invalidate(struct batcher *b);
/* Move the overlay's accounts into the cache: they are now committed state. */
void commit_overlay(struct batcher *b);

/* --- append.c: the write pipeline ------------------------------------------------ */

/* Every event of the batch in one INSERT: parameters $1-$5, the columns of the events
 * in the batch's order; rows: stream, version, "txid.position" (sql_append's text).
 * The arrays are unnested in the select list, which hands the rows to the insert one by
 * one (unnest in FROM first copies them all into a tuplestore), and data and metadata
 * come as text[] parsed into jsonb row by row, in memory the executor resets per row:
 * as jsonb[] parameters every element's parse was kept until the statement's end, and
 * the backend's memory grew and shrank by that much with every batch
 * (docs/performance.md, "The append's memory per batch"). */
#define APPEND_EVENTS                                                                              \
	"INSERT INTO events (stream, version, type, data, metadata) "                              \
	"SELECT s, v, t, d::jsonb, m::jsonb FROM (SELECT unnest($1::text[]) AS s, "                \
	"unnest($2::integer[]) AS v, unnest($3::text[]) AS t, unnest($4::text[]) AS d, "           \
	"unnest($5::text[]) AS m) AS u "                                                           \
	"RETURNING stream, version, txid::text || '.' || position::text"

/* Queue the batch's events (result 0, when it has any) and its idempotency records
 * (*nrecords of them; in the events' statement when there are events), its snapshots
 * and its fence. Nothing is queued when there is
 * nothing to write. False when out of memory. */
bool append_queue(struct batcher *b, size_t *nrecords) __attribute__((warn_unused_result));
/* Queue the fence alone, as the transaction of a batch that writes nothing but replays
 * stored answers (see write_batch in batcher.c). False when the connection refused it. */
bool append_queue_barrier(struct batcher *b) __attribute__((warn_unused_result));
/* The log position ("txid.position") of event i, from the committed write's results
 * ("" should the log not have returned it). */
const char *append_position(struct batcher *b, PGresult *const *results, int i);

/* One column of a set-based statement: a text[] literal being built (columns.c, used by
 * append.c and idem.c). */
struct column {
	struct evbuffer *buf; /* owned until column_take */
	size_t n;
	bool ok;
};
#define APPEND_MAX_COLUMNS 13
void column_open(struct column *c);
/* Append a value (NULL for SQL NULL); a failure shows in column_take. */
void column_add(struct column *c, const char *value);
/* The literal (caller frees), or NULL when memory ran out; closes the column. */
char *column_take(struct column *c);
/* Queue `statement` with the n columns as its parameters, closing them. */
bool queue_columns(struct pg *pg, const char *statement, int n, struct column *cols)
	__attribute__((warn_unused_result));

/* --- idem.c: idempotency ---------------------------------------------------------- */

/* Mark cmd's key as in flight; false when another command holds it (*busy) or memory
 * ran out. */
bool idem_mark(struct batcher *b, struct cmd *cmd, bool *busy) __attribute__((warn_unused_result));
/* Release cmd's marker, if cmd holds it. */
void idem_release(struct batcher *b, const struct cmd *cmd);
/* Stored idempotency records decide their commands: replay, or refuse a reuse. */
void idem_apply(struct batcher *b, PGresult *r);
/* Decided outcomes worth storing: successes and business refusals. */
bool idem_keeps_record(const struct slot *s);
/* How many of the batch's decided outcomes are worth storing. */
size_t idem_count_records(const struct batcher *b);
/* Open cols and fill them with those records, in the order of the parameters of
 * sql_idem_put ($1-$8) and of sql_append_idem ($6-$13); false when out of memory
 * (cols are then closed). */
#define IDEM_COLUMNS 8
bool idem_record_columns(struct batcher *b, struct column cols[IDEM_COLUMNS])
	__attribute__((warn_unused_result));

/* --- statement texts (each room's own; statements.c names them) ----------------- */

extern const char sql_load_streams[], sql_load_streams_full[], sql_load_transfers[],
	sql_load_idem[], sql_append[], sql_append_idem[], sql_idem_put[], sql_snapshot_put[],
	sql_fence[];

#endif
