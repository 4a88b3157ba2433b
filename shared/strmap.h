/* A string-keyed hash map (open hashing, SipHash-1-3 keyed per map), for caches and sets.
 * Each map draws its own random hash key (getrandom) when opened, so clients that
 * choose the keys (account ids, idempotency keys) cannot aim them at one bucket. */
#ifndef DAYBOOK_STRMAP_H
#define DAYBOOK_STRMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct strmap;

/* `free_value` (may be NULL) releases values on removal, clear and close. Fails with a
 * negative errno when out of memory or when no random hash key can be had. */
int strmap_open(struct strmap **out, void (*free_value)(void *))
	__attribute__((warn_unused_result));
void strmap_close(struct strmap **map);

/* The value stored under key, or NULL. */
void *strmap_get(const struct strmap *map, const char *key);
/* Store value under key (the key is copied), replacing (and freeing) an old value.
 * False when out of memory; the value is then not owned by the map. */
bool strmap_put(struct strmap *map, const char *key, void *value)
	__attribute__((warn_unused_result));
/* Remove key (freeing its value); false when absent. */
bool strmap_remove(struct strmap *map, const char *key);
void strmap_clear(struct strmap *map);
size_t strmap_count(const struct strmap *map);
/* Call fn for every entry, in no particular order; fn must not change the map. */
void strmap_foreach(const struct strmap *map, void (*fn)(void *arg, const char *key, void *value),
		    void *arg);

/* Start fetching what a look-up of a key will read, for a caller about to look up many
 * keys in a large map whose entries are out of the CPU's caches: for each key's
 * strmap_hash, call it with stage 0, then for each with stage 1 (the bucket, then the
 * entry it leads to), then look them up; the fetches overlap instead of each look-up
 * waiting for its own. A hint: it changes nothing. */
void strmap_prefetch(const struct strmap *map, uint64_t key_hash, int stage);

/* The bucket hash of key in this map (it depends on the map's random key). */
uint64_t strmap_hash(const struct strmap *map, const char *key);
/* SipHash with key (k0, k1), little-endian, and the given numbers of compression and
 * finalisation rounds: 1 and 3 for the maps, 2 and 4 for the published test vectors. */
uint64_t strmap_siphash(uint64_t k0, uint64_t k1, const void *data, size_t len, int crounds,
			int drounds);

#endif
