/* The read models' one owner (docs/read-models.md): the Redis key layout, the JSON
 * bodies, the constants, the SQL time format and the fold from events to rows, for
 * every writer and reader: the projector, daybook-admin rebuild, verify and status,
 * and the query service. readmodel.c: bodies, times, positions; readmodel_keys.c:
 * keys; readmodel_sql.c: bodies' fields from SQL rows; readmodel_fold.c: the fold. */
#ifndef DAYBOOK_READMODEL_H
#define DAYBOOK_READMODEL_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "ledger.h"

/* An account as the read models hold it; strings are borrowed. */
struct readmodel_account {
	const char *account_id, *name, *currency, *status;
	int64_t balance, overdraft_limit;
	int32_t version;
	const char *opened_at, *updated_at; /* RFC 3339 UTC with microseconds */
};

/* One statement item; optional strings are NULL when absent. */
struct readmodel_entry {
	int32_t version;
	const char *type; /* deposit, withdrawal, transfer_in, transfer_out */
	int64_t amount, balance_after;
	const char *transfer_id, *counterparty, *reference, *at;
};

struct readmodel_transfer {
	const char *transfer_id, *from, *to, *currency, *reference, *at;
	int64_t amount;
};

/* Advisory lock key: projector writes hold it shared, a rebuild's switch holds it
 * exclusively, so no batch commits while read models are swapped. */
#define READMODEL_SWITCH_LOCK "1685551459"

/* PostgreSQL channel: the projector NOTIFYs the SQL checkpoint's new token in each
 * batch's transaction; the query service LISTENs to wake reads waiting for it. */
#define READMODEL_POSITION_CHANNEL "daybook_position"

/* --- The Redis key layout (docs/read-models.md) -------------------------------------
 * Every key is named here: C code formats keys with readmodel_key*, Lua scripts are
 * built from these macros (READMODEL_LUA_GEN_KEY, or the prefix and kinds spliced
 * into the script text), so that the layout is spelled once. A generation's keys are
 * READMODEL_GEN_PREFIX "<gen>:<kind>[:<id>]". */
#define READMODEL_GEN_PREFIX "dbk:g:"
#define READMODEL_GEN_MATCH READMODEL_GEN_PREFIX "*" /* SCAN MATCH: every generation's keys */
#define READMODEL_GENERATION_KEY "dbk:generation"    /* INCR gives a new generation number */
/* Redis channel: "<generation> <token>" is PUBLISHed when a generation's checkpoint
 * moves (a projector batch, a resync or a rebuild's switch). */
#define READMODEL_POSITION_TOPIC "dbk:position"
#define READMODEL_KIND_ACCOUNT "acct"   /* hash: v version, n statement items, j body; :<id> */
#define READMODEL_KIND_STATEMENT "stmt" /* list of item bodies, newest first; :<id> */
#define READMODEL_KIND_TRANSFER "xfer"  /* string: the body; :<id> */
#define READMODEL_KIND_TOTALS "totals"  /* hash: p checkpoint token, j GET /totals's body */
#define READMODEL_KIND_CHECKPOINT "checkpoint" /* string: the token the generation reached */
#define READMODEL_KIND_IDENTITY "identity"     /* string: READMODEL_IDENTITY_SQL's text */
#define READMODEL_KIND_LAYOUT "layout"         /* string: READMODEL_REDIS_LAYOUT */
#define READMODEL_KIND_ENTRIES_V1 "entries"    /* layout 1's statements (sorted sets) */
/* Room for any key of an account or transfer, with its NUL. */
#define READMODEL_KEY_MAX (sizeof(READMODEL_GEN_PREFIX) + 21 + 16 + LEDGER_ID_MAX + 1)

/* The key of generation gen of `kind` and, unless NULL, of entity `id`, into out
 * (truncated to len - 1 bytes, always terminated when len > 0). Returns the length
 * the whole key has, as snprintf does. Made for every item written, so cheap. */
size_t readmodel_key(char *out, size_t len, long long gen, const char *kind, const char *id);
/* The same with the generation as its decimal text (as Redis replies give it). */
size_t readmodel_key_text(char *out, size_t len, const char *gen, const char *kind, const char *id);
/* The SCAN pattern of every key of generation gen ("...:<gen>:*"). */
size_t readmodel_key_match(char *out, size_t len, long long gen);
/* The generation a key belongs to; 0 when it is no generation's key. */
long long readmodel_key_generation(const char *key);
/* Lua, for the scripts: gen_key(g, kind) is generation g's key of `kind` (kind may
 * carry ":<id>"); gen_of(key) the generation of a key, as a string, or nil. */
#define READMODEL_LUA_GEN_KEY                                                                      \
	"local function gen_key(g, kind) return '" READMODEL_GEN_PREFIX                            \
	"' .. g .. ':' .. kind end "                                                               \
	"local function gen_of(key) return string.match(key, '^" READMODEL_GEN_PREFIX              \
	"(%d+):') end\n"

/* The Redis layout a generation was written in, kept in its `layout` key. 2: statements
 * are lists (`stmt:<id>`, newest first); 1 (no key) had sorted sets. Each layout has
 * its own pointer to its live generation, so that binaries of different layouts, in
 * a rolling upgrade, never read or write each other's generations. */
#define READMODEL_REDIS_LAYOUT "2"
#define READMODEL_LIVE_KEY "dbk:live:2"
/* Fencing of the projector's Redis writes (docs/architecture.md, "Leadership"): the
 * highest leader epoch that has written, one key per event store identity
 * (READMODEL_LEADER_KEY + identity), so that deployments never fence each other. Every
 * projector write script starts with READMODEL_LUA_FENCE and takes the fence argument
 * "<epoch>:<identity>" as ARGV[1] (the prefix removes it, so the rest of the script sees
 * its own arguments from ARGV[1]): an epoch below the key's is refused with an error
 * reply starting "FENCED"; a higher one raises the key first. */
#define READMODEL_LEADER_KEY "dbk:leader_epoch:"
#define READMODEL_FENCE_ARG_MAX (24 + READMODEL_IDENTITY_MAX)
#define READMODEL_LUA_FENCE                                                                        \
	"local fence_arg = table.remove(ARGV, 1) "                                                 \
	"local epoch_text, fence_of = string.match(fence_arg, '^(%d+):(.*)$') "                    \
	"local epoch = tonumber(epoch_text) "                                                      \
	"local fence_key = '" READMODEL_LEADER_KEY "' .. (fence_of or '') "                        \
	"local fence = tonumber(redis.call('GET', fence_key) or '0') "                             \
	"if not epoch or epoch < 1 or epoch < fence then "                                         \
	"return redis.error_reply('FENCED epoch ' .. tostring(epoch) .. "                          \
	"' is older than the leader epoch ' .. fence) end "                                        \
	"if epoch > fence then redis.call('SET', fence_key, epoch_text) end\n"
/* The identity of the event store a Redis generation was built from, kept in its
 * `identity` key: "<system identifier>-<database oid>-<deployment id>", read from SQL
 * with READMODEL_IDENTITY_SQL (sql/009). A generation of another identity (another
 * deployment, or an earlier life of the database) counts as none: the projector
 * builds its own, readers use SQL meanwhile (docs/read-models.md). */
#define READMODEL_IDENTITY_SQL "SELECT daybook_store_identity()"
#define READMODEL_IDENTITY_MAX 128 /* with its NUL; the text is about 60 bytes */
/* Is the position token ($1 its txid, $2 its position) an event of this log? A Redis
 * generation ahead of the SQL checkpoint names one as its checkpoint; a physical restore
 * to an earlier point leaves Redis with tokens the log does not have (the projector's
 * adoption check, verify). */
#define READMODEL_EVENT_AT_SQL                                                                     \
	"SELECT 1 FROM events WHERE txid = $1::xid8 AND position = $2::bigint"
/* Statement items kept per account in Redis: the newest ones. READMODEL_ITEMS_KEPT_TEXT
 * is the same number as text, for SQL (LIMIT) and Lua. */
#define READMODEL_ITEMS_KEPT 50
#define READMODEL_TEXT_(x) #x
#define READMODEL_TEXT(x) READMODEL_TEXT_(x)
#define READMODEL_ITEMS_KEPT_TEXT READMODEL_TEXT(READMODEL_ITEMS_KEPT)

/* SQL: a timestamptz column as the read models write times (readmodel_time_text). */
#define READMODEL_SQL_TIME(col)                                                                    \
	"to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/* The version a statement item's JSON starts with ({"version":N,...}); -1 when the
 * text does not start so. Lua scripts match the same prefix. */
long long readmodel_item_version(const char *json);
/* The same in Lua, for the scripts: item_version(s), 0 when s does not start so. */
#define READMODEL_LUA_ITEM_VERSION                                                                 \
	"local function item_version(s) "                                                          \
	"return tonumber(string.match(s, '^{\"version\":(%d+),')) or 0 end\n"

/* Each returns a new compact JSON text (caller frees with free()), or NULL when out
 * of memory. Keys come in the documented order. */
char *readmodel_account_json(const struct readmodel_account *a);
char *readmodel_entry_json(const struct readmodel_entry *e);
char *readmodel_transfer_json(const struct readmodel_transfer *t);
/* The same bodies appended to one growing buffer, each with its NUL (many bodies, one
 * allocation): each returns the offset of its body in b->p, or (size_t)-1 when out of
 * memory or a string is not UTF-8 (b->len is then as it was). The buffer moves as it
 * grows: keep offsets, not pointers, until the last body is in. Reuse it (len = 0)
 * and free it with readmodel_text_free. */
struct readmodel_text {
	char *p;
	size_t len, cap;
};
size_t readmodel_account_json_append(struct readmodel_text *b, const struct readmodel_account *a);
size_t readmodel_entry_json_append(struct readmodel_text *b, const struct readmodel_entry *e);
size_t readmodel_transfer_json_append(struct readmodel_text *b, const struct readmodel_transfer *t);
void readmodel_text_free(struct readmodel_text *b);

/* One currency's member of GET /totals; the numbers are decimal integer texts (the
 * sum of balances may exceed int64). Strings are borrowed. */
struct readmodel_total {
	const char *currency, *accounts, *open_accounts, *balance_sum;
};
/* GET /totals's body for n rows (any number), in the order given: callers sort them
 * by currency, bytewise. The one rendering of totals, shared by the projector,
 * daybook-admin and the query service's SQL path, so that their bodies are
 * byte-identical. Caller frees; NULL when out of memory or when a currency is not
 * of ISO 4217 shape or a number is not an integer text. */
char *readmodel_totals_json(const struct readmodel_total *rows, size_t n);

/* The statement item type of a money event ("deposit", "withdrawal", "transfer_in",
 * "transfer_out"); NULL for events that make no statement item. */
const char *readmodel_entry_type(enum ledger_event_type type);
/* A PostgreSQL timestamptz in binary form (microseconds since 2000-01-01 00:00 UTC)
 * as the read models write times: "YYYY-MM-DDTHH:MM:SS.ffffffZ", the same text as
 * to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') for years 1-9999. */
#define READMODEL_TIME_LEN 28
void readmodel_time_text(int64_t pg_micros, char out[READMODEL_TIME_LEN]);
/* An RFC 3339 date-time ("2026-01-31T23:59:59Z", "2026-01-31T12:00:00.5+01:00"; 't',
 * 'z', a space for 'T', and a space for the offset's '+', which an unencoded '+' in a
 * query string decodes to, are accepted) in the same binary form; digits beyond the
 * microsecond are cut. False when malformed, or outside the years 1-9999 in UTC. */
bool readmodel_time_parse(const char *text, int64_t *pg_micros) __attribute__((warn_unused_result));
/* Decimal text of a 128-bit integer: a sum of int64 balances can exceed int64. */
void readmodel_int128_text(__int128 v, char out[48]);

/* --- Bodies from SQL rows of the read-model tables (readmodel_sql.c) ------------------
 * The columns, in this order, of an account, a statement item and a transfer, for a
 * select list: `a`, `e` and `t` are the qualifier of rm_accounts', rm_entries' and
 * rm_transfers' columns ("e", or the table's name). readmodel_*_from_pg read them
 * from column col on; strings are borrowed from the result, SQL NULLs are NULL. */
#define READMODEL_SQL_ACCOUNT_COLUMNS(a)                                                           \
	a ".account_id, " a ".name, " a ".currency, " a ".balance, " a ".overdraft_limit, " a      \
	  ".status, " a                                                                            \
	  ".version, " READMODEL_SQL_TIME(a ".opened_at") ", " READMODEL_SQL_TIME(a ".updated_at")
#define READMODEL_SQL_ENTRY_COLUMNS(e)                                                             \
	e ".version, " e ".type, " e ".amount, " e ".balance_after, " e ".transfer_id, " e         \
	  ".counterparty, " e ".reference, " READMODEL_SQL_TIME(e ".at")
#define READMODEL_SQL_TRANSFER_COLUMNS(t)                                                          \
	t ".transfer_id, " t ".from_account, " t ".to_account, " t ".amount, " t ".currency, " t   \
	  ".reference, " READMODEL_SQL_TIME(t ".at")
typedef struct pg_result PGresult;
struct readmodel_account readmodel_account_from_pg(const PGresult *res, int row, int col);
struct readmodel_entry readmodel_entry_from_pg(const PGresult *res, int row, int col);
struct readmodel_transfer readmodel_transfer_from_pg(const PGresult *res, int row, int col);

/* --- The fold from events to read-model rows (readmodel_fold.c) ------------------------
 * The one fold the projector, `daybook-admin rebuild` and the query service's time
 * travel apply (`verify` folds on its own on purpose, to check this one). */

/* An account's row as the read models hold it: the domain's state and what the read
 * models add to it. The times are the caller's to keep, each in its own form (text in
 * the projector, binary in rebuild): an event's time is the row's updated_at, and its
 * opened_at when the change says `opened`. A zeroed row is an account not opened. */
struct readmodel_row {
	struct ledger_account acc;
	char name[LEDGER_NAME_MAX + 1];
	int32_t entries; /* statement items: the money events folded */
};

/* One currency's totals (GET /totals), or by how much an event moves them. */
struct readmodel_count {
	int64_t accounts, open_accounts;
	__int128 balance_sum; /* a sum of int64 balances may exceed int64 */
};

/* What one event did to the read models, for the caller's writes. */
struct readmodel_change {
	bool opened;            /* AccountOpened: the event's time is the row's opened_at */
	const char *entry_type; /* a statement item of this type (readmodel_entry_of), or NULL */
	bool transfer;          /* TransferSent: a transfer row (readmodel_transfer_of) */
	struct readmodel_count totals; /* the row's currency's totals move by this */
};

/* Fold event ev (decoded from the log; `version` is its stream version) of account
 * `id` into row. ev->account_id is set for AccountOpened (the log keeps the id in the
 * stream name). False, with the row unchanged, when the event does not follow the
 * row's version or the domain refuses it (ledger_evolve): the caller's fold is broken. */
bool readmodel_fold(struct readmodel_row *row, const char *id, int32_t version,
		    struct ledger_event *ev, struct readmodel_change *out)
	__attribute__((warn_unused_result));
/* to += d. */
void readmodel_count_add(struct readmodel_count *to, const struct readmodel_count *d);
/* "open" or "closed". */
const char *readmodel_status(const struct ledger_account *acc);
/* The bodies' fields of a folded row and of the event just folded into it (strings
 * borrowed from row, ev and the times): the account, the statement item the change
 * made (at the row's version and balance), the transfer it made (from the row). */
struct readmodel_account readmodel_account_of(const struct readmodel_row *row,
					      const char *opened_at, const char *updated_at);
struct readmodel_entry readmodel_entry_of(const struct readmodel_row *row,
					  const struct ledger_event *ev, const char *at);
struct readmodel_transfer readmodel_transfer_of(const struct readmodel_row *from,
						const struct ledger_event *ev, const char *at);
/* One currency's totals as the folds keep them. */
struct readmodel_totals {
	char currency[4];
	struct readmodel_count count;
};
/* GET /totals's body from n currencies' totals, in any order (sorted here, bytewise by
 * currency); rows themselves are not reordered. Caller frees; NULL as
 * readmodel_totals_json. */
char *readmodel_totals_json_of(const struct readmodel_totals *const *rows, size_t n);

/* Position tokens "<txid>.<position>": parse (false when malformed) and compare. */
struct readmodel_position {
	uint64_t txid;
	uint64_t position;
};
bool readmodel_position_parse(const char *text, struct readmodel_position *out)
	__attribute__((warn_unused_result));
int readmodel_position_cmp(const struct readmodel_position *a, const struct readmodel_position *b);

#endif
