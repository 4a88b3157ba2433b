/* daybook-admin verify: what its rooms share (the state of one run and the functions
 * one room calls in another). Internal to admin/verify*.c. */
#ifndef DAYBOOK_ADMIN_VERIFY_H
#define DAYBOOK_ADMIN_VERIFY_H

#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "admin.h"
#include "ledger.h"
#include "readmodel.h"
#include "strmap.h"

#define FETCH_ROWS 5000
#define REDIS_CHUNK 256 /* checks per pipelined round trip */
#define DIFFS_PRINTED 1000
#define REDIS_WAIT_SECONDS 5.0 /* for Redis to reach the snapshot's checkpoint */
#define TEXT_TIME(col) READMODEL_SQL_TIME(col)
#define AT_SNAPSHOT "(txid, position) <= ($1::xid8, $2::bigint)"

/* A Redis check waiting for its replies; the expected texts are owned. */
struct pending {
	bool transfer;
	char id[LEDGER_ID_MAX + 1];
	int32_t version, entries;
	char *json;
	long long ahead; /* an account: Redis's version, when past the folded one (else 0) */
	char *items[READMODEL_ITEMS_KEPT]; /* statement items, oldest first */
	int32_t item_versions[READMODEL_ITEMS_KEPT];
	size_t nitems;
};

struct verify {
	const struct log *log; /* the command's (admin_ctx) */
	PGconn *pg;
	const char *conninfo; /* the command's (admin_ctx) */
	PGconn *now;          /* the log as it is now, not at the snapshot: opened on need */
	redisContext *redis;  /* NULL: Redis is not checked (or no longer) */
	char gen[32];         /* the live generation */
	char foreign[32];     /* the live generation, when another store's (not checked) */
	char cp_txid[24], cp_pos[24], cp_token[48];
	struct readmodel_position cp;
	unsigned long long events, accounts, entries, transfers, newer, diffs;
	bool failed; /* the verification could not complete */
	struct readmodel_totals *totals;
	size_t ntotals, tcap;
	struct pending pending[REDIS_CHUNK];
	size_t npending;
	struct strmap *orphans; /* orphan keys reported (see orphan_diff) */
};

/* The state of one account, folded from its stream. */
struct folded {
	const char *id;
	struct ledger_account acc;
	char name[LEDGER_NAME_MAX + 1];
	int32_t entries;
	char opened_at[32], updated_at[32];
	bool broken; /* an event did not apply: the rest of the stream is not folded */
	char *ring[READMODEL_ITEMS_KEPT]; /* the newest statement items as JSON (Redis check) */
	int32_t ring_version[READMODEL_ITEMS_KEPT];
	size_t pushed;
};

/* A server-side cursor, read FETCH_ROWS rows at a time; one row is current. */
struct cursor {
	struct verify *v;
	const char *name;
	PGresult *res;
	int row;
	bool end; /* the last FETCH came back short */
};

/* The rooms, in layers: a room calls only rooms below it, never one above or beside it.
 *   verify.c          the command: connects, reads the checkpoint, runs the passes
 *   verify_compare.c  the independent fold and its comparison; uses Redis, SQL, report
 *   verify_redis.c    reading Redis and checking what it holds; uses SQL, report
 *   verify_sql.c      reading PostgreSQL through cursors; uses report
 *   verify_report.c   DIFF lines and failures; uses none */

/* reporting (verify_report.c) */
__attribute__((format(printf, 2, 3))) void verify_fail(struct verify *v, const char *fmt, ...);
void verify_diff(struct verify *v, const char *model, const char *entity, const char *field,
		 const char *expected, const char *found);
void verify_field(struct verify *v, const char *model, const char *entity, const char *name,
		  const char *expected, const char *found);
void verify_field_int(struct verify *v, const char *model, const char *entity, const char *name,
		      long long expected, const char *found);

/* reading PostgreSQL (verify_sql.c) */
bool verify_exec(struct verify *v, const char *sql);
bool cursor_open(struct cursor *c, struct verify *v, const char *name, const char *query,
		 bool snapshot);
void cursor_next(struct cursor *c);
const char *cursor_col(const struct cursor *c, int column);
const char *cursor_head(struct cursor *c);
void cursor_close(struct cursor *c);
/* Is the position token an event of the log as it is now (outside the snapshot)? false
 * also when the look-up failed (then v->failed is set). */
bool verify_event_in_log(struct verify *v, const char *token);
/* query with params on the log as it is now; NULL (and v->failed) when it failed.
 * Caller PQclears. */
PGresult *verify_now(struct verify *v, const char *query, int nparams, const char *const *params);

/* reading Redis (verify_redis.c) */
const char *verify_reply_str(const redisReply *r);
void verify_redis_lost(struct verify *v);
void pending_free(struct pending *p);
void verify_redis_flush(struct verify *v);
struct pending *pending_add(struct verify *v);
void verify_redis_prepare(struct verify *v);
void verify_redis_recheck_live(struct verify *v);
void verify_pass_redis_orphans(struct verify *v);

/* the independent fold and the comparison (verify_compare.c) */
void verify_pass_accounts(struct verify *v);
void verify_pass_transfers(struct verify *v);
void verify_check_totals(struct verify *v);

#endif
