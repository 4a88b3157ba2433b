/* A string-keyed hash map (open hashing, FNV-1a), for caches and small sets. */
#ifndef DAYBOOK_STRMAP_H
#define DAYBOOK_STRMAP_H

#include <stdbool.h>
#include <stddef.h>

struct strmap;

/* `free_value` (may be NULL) releases values on removal, clear and close. */
int strmap_open(struct strmap **out, void (*free_value)(void *)) __attribute__((warn_unused_result));
void strmap_close(struct strmap **map);

/* The value stored under key, or NULL. */
void *strmap_get(const struct strmap *map, const char *key);
/* Store value under key (the key is copied), replacing (and freeing) an old value.
 * False when out of memory; the value is then not owned by the map. */
bool strmap_put(struct strmap *map, const char *key, void *value) __attribute__((warn_unused_result));
/* Remove key (freeing its value); false when absent. */
bool strmap_remove(struct strmap *map, const char *key);
void strmap_clear(struct strmap *map);
size_t strmap_count(const struct strmap *map);
/* Call fn for every entry, in no particular order; fn must not change the map. */
void strmap_foreach(const struct strmap *map, void (*fn)(void *arg, const char *key, void *value),
		    void *arg);

#endif
