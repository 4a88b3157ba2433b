/* The Lua scripts of the projector's Redis writes, loaded on every connection and run
 * by index (enum redis_script, redis_sync.h). */
#include "redis_sync.h"

/* newer(a, b): is position token a after b? Lua numbers are doubles: exact to 2^53. */
#define LUA_NEWER                                                                                  \
	"local function newer(a, b) "                                                              \
	"local at, ap = string.match(a, '^(%d+)%.(%d+)$') "                                        \
	"local bt, bp = string.match(b, '^(%d+)%.(%d+)$') "                                        \
	"if not bt then return true end "                                                          \
	"at, ap, bt, bp = tonumber(at), tonumber(ap), tonumber(bt), tonumber(bp) "                 \
	"return at > bt or (at == bt and ap > bp) end "

/* Transfers per MSET of a batch: unpack() and a command's arguments stay small. */
#define PUT_BATCH_MSET_MAX "500"

/* The batch writer's one call (redis_batch.c). ARGV after the fence: the generation,
 * the store's identity, the new checkpoint token, where the batch starts, the totals'
 * body, the number of accounts and of transfers; then each account (key, version,
 * entries, body), each transfer (key, body), and each account's statement items (key,
 * count, then the bodies, oldest first; at most READMODEL_ITEMS_KEPT, so they go in
 * with one LPUSH, trimmed only when the list outgrows the statement). The keys are
 * the generation's, made in C (readmodel_key).
 * It first checks, as LIVE_STATUS does, that the generation is still the live one of
 * this store ({'LOST'} or {'MOVED', live, its checkpoint} otherwise, nothing written),
 * then that the generation holds everything up to where the batch starts (the GAP
 * error, nothing written). When the generation's checkpoint is exactly where the batch
 * starts and the caller says it wrote the generation up to there itself (ARGV[8] "1":
 * its previous batch landed there), the generation holds that fold and nothing after
 * it (every batch lands whole or its generation is replaced, see docs/read-models.md),
 * so the batch's versions are all newer than what it holds: the writes go in
 * unguarded, one command per key and one MSET for the transfers. A generation already past the start (a replay, or one a
 * rebuild filled) gets every write guarded as the single-purpose scripts' (a replay
 * is a no-op). The checkpoint is written last, so an error reply from any write
 * (WRONGTYPE, say) ends the script before it. */
#define PUT_BATCH_LUA                                                                              \
	READMODEL_LUA_FENCE LUA_NEWER READMODEL_LUA_ITEM_VERSION READMODEL_LUA_GEN_KEY             \
		"local gen, token, from = ARGV[1], ARGV[3], ARGV[4] "                              \
		"local g = gen_key(gen, '') "                                                      \
		"local head = redis.call('MGET', '" READMODEL_LIVE_KEY "', "                       \
		"g .. '" READMODEL_KIND_LAYOUT "', g .. '" READMODEL_KIND_IDENTITY "', "           \
		"g .. '" READMODEL_KIND_CHECKPOINT "') "                                           \
		"local live = head[1] "                                                            \
		"if live ~= gen then "                                                             \
		"if not live or redis.call('GET', gen_key(live, '" READMODEL_KIND_LAYOUT           \
		"')) ~= '" READMODEL_REDIS_LAYOUT "' or "                                          \
		"redis.call('GET', gen_key(live, '" READMODEL_KIND_IDENTITY "')) "                 \
		"~= ARGV[2] then return {'LOST'} end "                                             \
		"return {'MOVED', live, "                                                          \
		"redis.call('GET', gen_key(live, '" READMODEL_KIND_CHECKPOINT "')) or ''} end "    \
		"if head[2] ~= '" READMODEL_REDIS_LAYOUT "' or head[3] ~= ARGV[2] then "           \
		"return {'LOST'} end "                                                             \
		"local cur = head[4] or nil "                                                      \
		"if from ~= '' and (not cur or newer(from, cur)) then "                            \
		"return redis.error_reply('GAP the generation is at ' .. tostring(cur) .. "        \
		"', the batch starts at ' .. from) end "                                           \
		"local exact = from ~= '' and cur == from and ARGV[8] == '1' "                     \
		"local i = 9 "                                                                     \
		"for _ = 1, tonumber(ARGV[6]) do "                                                 \
		"local k = ARGV[i] "                                                               \
		"local v = not exact and redis.call('HGET', k, 'v') "                              \
		"if not v or tonumber(v) < tonumber(ARGV[i + 1]) then "                            \
		"redis.call('HSET', k, 'v', ARGV[i + 1], 'n', ARGV[i + 2], 'j', ARGV[i + 3]) end " \
		"i = i + 4 end "                                                                   \
		"local nx = tonumber(ARGV[7]) "                                                    \
		"while nx > 0 do "                                                                 \
		"local c = math.min(nx, " PUT_BATCH_MSET_MAX ") "                                  \
		"redis.call('MSET', unpack(ARGV, i, i + 2 * c - 1)) "                              \
		"i, nx = i + 2 * c, nx - c end "                                                   \
		"while i <= #ARGV do "                                                             \
		"local k, a = ARGV[i], i + 2 "                                                     \
		"local z = a + tonumber(ARGV[i + 1]) - 1 "                                         \
		"local top = not exact and redis.call('LINDEX', k, 0) "                            \
		"if not top or item_version(ARGV[a]) > item_version(top) then "                    \
		"if redis.call('LPUSH', k, unpack(ARGV, a, z)) > " READMODEL_ITEMS_KEPT_TEXT       \
		" then redis.call('LTRIM', k, 0, " READMODEL_ITEMS_KEPT_TEXT " - 1) end "          \
		"else "                                                                            \
		"local by, vs = {}, {} "                                                           \
		"for _, item in ipairs(redis.call('LRANGE', k, 0, -1)) do "                        \
		"local v = item_version(item) "                                                    \
		"if not by[v] then by[v] = item; vs[#vs + 1] = v end end "                         \
		"for j = a, z do "                                                                 \
		"local v = item_version(ARGV[j]) "                                                 \
		"if not by[v] then by[v] = ARGV[j]; vs[#vs + 1] = v end end "                      \
		"table.sort(vs, function(x, y) return x > y end) "                                 \
		"redis.call('DEL', k) "                                                            \
		"for j = 1, math.min(#vs, " READMODEL_ITEMS_KEPT_TEXT ") do "                      \
		"redis.call('RPUSH', k, by[vs[j]]) end "                                           \
		"end "                                                                             \
		"i = z + 1 end "                                                                   \
		"local tp = not exact and redis.call('HGET', g .. '" READMODEL_KIND_TOTALS         \
		"', 'p') "                                                                         \
		"if not tp or newer(token, tp) then "                                              \
		"redis.call('HSET', g .. '" READMODEL_KIND_TOTALS                                  \
		"', 'p', token, 'j', ARGV[5]) end "                                                \
		"redis.call('PUBLISH', '" READMODEL_POSITION_TOPIC "', gen .. ' ' .. token) "      \
		"if cur and not newer(token, cur) then return 0 end "                              \
		"redis.call('SET', g .. '" READMODEL_KIND_CHECKPOINT "', token) return 1"

/* The write scripts take the writer's leader epoch first (READMODEL_LUA_FENCE). */
static const char *const scripts[] = {
	[PUT_BATCH] = PUT_BATCH_LUA,
	[PUT_ACCOUNT] = READMODEL_LUA_FENCE
	"local v = redis.call('HGET', KEYS[1], 'v') "
	"if v and tonumber(v) >= tonumber(ARGV[1]) then return 0 end "
	"redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', ARGV[2], 'j', ARGV[3]) "
	"return 1",
	/* ARGV: the items' versions and JSON, oldest first. The statement (newest first)
	 * is a set of items by version, as a sorted set would be: items newer than its
	 * newest go in front; any other (a replay, or a resync over a generation that a
	 * stale batch wrote to) is merged in by version, each version once. Then the
	 * newest READMODEL_ITEMS_KEPT stay. */
	[PUT_ITEMS] = READMODEL_LUA_FENCE READMODEL_LUA_ITEM_VERSION
	"local top = redis.call('LINDEX', KEYS[1], 0) "
	"if not top or tonumber(ARGV[1]) > item_version(top) then "
	"for i = 1, #ARGV, 2 do redis.call('LPUSH', KEYS[1], ARGV[i + 1]) end "
	"else "
	"local by, vs = {}, {} "
	"for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do "
	"local v = item_version(item) "
	"if not by[v] then by[v] = item; vs[#vs + 1] = v end end "
	"for i = 1, #ARGV, 2 do "
	"local v = tonumber(ARGV[i]) "
	"if not by[v] then by[v] = ARGV[i + 1]; vs[#vs + 1] = v end end "
	"table.sort(vs, function(x, y) return x > y end) "
	"redis.call('DEL', KEYS[1]) "
	"for i = 1, math.min(#vs, " READMODEL_ITEMS_KEPT_TEXT ") do "
	"redis.call('RPUSH', KEYS[1], by[vs[i]]) end "
	"end "
	"redis.call('LTRIM', KEYS[1], 0, " READMODEL_ITEMS_KEPT_TEXT " - 1) return 1",
	/* ARGV[2], when given, is where the batch started: the generation must already
	 * hold everything up to there, or the checkpoint would cover batches it never got
	 * (another leader's, or one of ours whose SQL outcome was unknown). */
	[PUT_CHECKPOINT] = READMODEL_LUA_FENCE LUA_NEWER
	"local cur = redis.call('GET', KEYS[1]) "
	"if ARGV[2] and (not cur or newer(ARGV[2], cur)) then "
	"return redis.error_reply('GAP the generation is at ' .. tostring(cur) .. "
	"', the batch starts at ' .. ARGV[2]) end "
	"if cur and not newer(ARGV[1], cur) then return 0 end "
	"redis.call('SET', KEYS[1], ARGV[1]) return 1",
	[PUT_TOTALS] = READMODEL_LUA_FENCE LUA_NEWER
	"local cur = redis.call('HGET', KEYS[1], 'p') "
	"if cur and not newer(ARGV[1], cur) then return 0 end "
	"redis.call('HSET', KEYS[1], 'p', ARGV[1], 'j', ARGV[2]) return 1",
	/* A live generation of another layout, or built from another event store (its
	 * identity is not ARGV[1]), counts as none: it is replaced. */
	[LIVE_STATUS] = READMODEL_LUA_GEN_KEY
	"local g = redis.call('GET', '" READMODEL_LIVE_KEY "') "
	"if not g then return false end "
	"if redis.call('GET', gen_key(g, '" READMODEL_KIND_LAYOUT "')) ~= '" READMODEL_REDIS_LAYOUT
	"' "
	"then return false end "
	"if redis.call('GET', gen_key(g, '" READMODEL_KIND_IDENTITY "')) ~= ARGV[1] "
	"then return false end "
	"return {g, redis.call('GET', gen_key(g, '" READMODEL_KIND_CHECKPOINT "')) or ''}",
	/* SET KEYS[1] ARGV[1]: transfers, a generation's layout and identity marks. */
	[PUT_FENCED] = READMODEL_LUA_FENCE "redis.call('SET', KEYS[1], ARGV[1]) return 1",
	[RAISE_FENCE] = READMODEL_LUA_FENCE "return 1",
	/* Make generation ARGV[1] live; the identity of the one it replaces when that is
	 * not ARGV[2] (another store's), else "". Not over a newer generation of this
	 * store (the NEWER error, nothing switched): a rebuild that took its number after
	 * this copy began switched to it meanwhile (after a FLUSHALL or a restart the
	 * numbers start again, so the copy's may be the lower), and its clean-up takes
	 * the older ones, this copy among them. */
	[SWITCH_LIVE] = READMODEL_LUA_FENCE READMODEL_LUA_GEN_KEY
	"local old = redis.call('GET', '" READMODEL_LIVE_KEY "') "
	"local theirs = old and redis.call('GET', gen_key(old, '" READMODEL_KIND_IDENTITY "')) "
	"if theirs == ARGV[2] and tonumber(old) and tonumber(old) > tonumber(ARGV[1]) then "
	"return redis.error_reply('NEWER generation ' .. old .. ' of this store is live') end "
	"redis.call('SET', '" READMODEL_LIVE_KEY "', ARGV[1]) "
	"if theirs and theirs ~= ARGV[2] then return theirs end return ''",
	/* Unlink the keys ARGV[3..] of generations older than ARGV[2] that are ours
	 * (identity ARGV[1]) or of no store (written before identities): another store's
	 * generations may be another deployment's live models, and are left alone. One
	 * UNLINK for them all (the caller sends a SCAN page, some 1,000 keys). */
	[CLEAN_OLD] = READMODEL_LUA_GEN_KEY
	"local ours, gone, below = {}, {}, tonumber(ARGV[2]) "
	"for i = 3, #ARGV do "
	"local g = gen_of(ARGV[i]) "
	"if g and tonumber(g) < below then "
	"if ours[g] == nil then "
	"local id = redis.call('GET', gen_key(g, '" READMODEL_KIND_IDENTITY "')) "
	"ours[g] = not id or id == ARGV[1] end "
	"if ours[g] then gone[#gone + 1] = ARGV[i] end end end "
	"for i = 1, #gone, 1000 do "
	"redis.call('UNLINK', unpack(gone, i, math.min(i + 999, #gone))) end "
	"return #gone",
};

const char *const *projector_redis_scripts(size_t *n)
{
	*n = sizeof(scripts) / sizeof(scripts[0]);
	return scripts;
}
