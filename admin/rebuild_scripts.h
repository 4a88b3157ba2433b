/* daybook-admin rebuild: its Redis scripts that move the live pointer (the switch and
 * its undoing), in a header of their own so that a test can know them on the wire. */
#ifndef DAYBOOK_ADMIN_REBUILD_SCRIPTS_H
#define DAYBOOK_ADMIN_REBUILD_SCRIPTS_H

/* The live pointer (KEYS[1]) goes to generation ARGV[1] unless it names a newer
 * generation, or the generation's identity key (KEYS[2]), written when its number was
 * taken and never again, no longer holds the store's identity (ARGV[2]): Redis lost the
 * generation's keys meanwhile (a FLUSHALL, a restart), those written before among them.
 * One step in Redis, so no projector's resync lands between the look and the change.
 * The reply is {1, the pointer it replaced or false} when switched, {0, the newer
 * pointer} or {-1, the pointer or false} (keys lost) when not. */
#define SWITCH_LIVE_LUA                                                                            \
	"local cur = redis.call('GET', KEYS[1]) "                                                  \
	"if cur and tonumber(cur) and tonumber(cur) > tonumber(ARGV[1]) then return {0, cur} end " \
	"if redis.call('GET', KEYS[2]) ~= ARGV[2] then return {-1, cur} end "                      \
	"redis.call('SET', KEYS[1], ARGV[1]) return {1, cur}"

/* The pointer back to ARGV[2] ("": none), only if it still names our generation
 * (ARGV[1]): a projector that made a newer generation live since keeps it. 1 put back,
 * 0 left alone (another generation is live), -1 there is no pointer. */
#define PUT_BACK_LIVE_LUA                                                                          \
	"local cur = redis.call('GET', KEYS[1]) "                                                  \
	"if not cur then return -1 end "                                                           \
	"if cur ~= ARGV[1] then return 0 end "                                                     \
	"if ARGV[2] == '' then redis.call('DEL', KEYS[1]) "                                        \
	"else redis.call('SET', KEYS[1], ARGV[2]) end return 1"

#endif
