/* The read models' JSON bodies, built one way for every writer and reader: the
 * projector stores them in Redis, the query service builds them from SQL rows, and
 * both must be byte-identical (docs/read-models.md). */
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
#define READMODEL_LUA_FENCE                                                                \
	"local fence_arg = table.remove(ARGV, 1) "                                         \
	"local epoch_text, fence_of = string.match(fence_arg, '^(%d+):(.*)$') "            \
	"local epoch = tonumber(epoch_text) "                                              \
	"local fence_key = '" READMODEL_LEADER_KEY "' .. (fence_of or '') "                \
	"local fence = tonumber(redis.call('GET', fence_key) or '0') "                     \
	"if not epoch or epoch < 1 or epoch < fence then "                                 \
	"return redis.error_reply('FENCED epoch ' .. tostring(epoch) .. "                  \
	"' is older than the leader epoch ' .. fence) end "                                \
	"if epoch > fence then redis.call('SET', fence_key, epoch_text) end\n"
/* The identity of the event store a Redis generation was built from, kept in its
 * `identity` key: "<system identifier>-<database oid>-<deployment id>", read from SQL
 * with READMODEL_IDENTITY_SQL (sql/009). A generation of another identity (another
 * deployment, or an earlier life of the database) counts as none: the projector
 * builds its own, readers use SQL meanwhile (docs/read-models.md). */
#define READMODEL_IDENTITY_SQL "SELECT daybook_store_identity()"
#define READMODEL_IDENTITY_MAX 128 /* with its NUL; the text is about 60 bytes */
/* Statement items kept per account in Redis: the newest ones. */
#define READMODEL_ITEMS_KEPT 50

/* The version a statement item's JSON starts with ({"version":N,...}); -1 when the
 * text does not start so. Lua scripts match the same prefix. */
long long readmodel_item_version(const char *json);
/* The same in Lua, for the scripts: item_version(s), 0 when s does not start so. */
#define READMODEL_LUA_ITEM_VERSION                                                         \
	"local function item_version(s) "                                                  \
	"return tonumber(string.match(s, '^{\"version\":(%d+),')) or 0 end\n"

/* Each returns a new compact JSON text (caller frees with free()), or NULL when out
 * of memory. Keys come in the documented order. */
char *readmodel_account_json(const struct readmodel_account *a);
char *readmodel_entry_json(const struct readmodel_entry *e);
char *readmodel_transfer_json(const struct readmodel_transfer *t);

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

/* Position tokens "<txid>.<position>": parse (false when malformed) and compare. */
struct readmodel_position {
	uint64_t txid;
	uint64_t position;
};
bool readmodel_position_parse(const char *text, struct readmodel_position *out)
	__attribute__((warn_unused_result));
int readmodel_position_cmp(const struct readmodel_position *a, const struct readmodel_position *b);

#endif
