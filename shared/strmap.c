/* A string-keyed hash map (open hashing, FNV-1a), for caches and small sets. */
#include "strmap.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct entry {
	struct entry *next;
	void *value;
	uint64_t hash;
	char key[];
};

struct strmap {
	struct entry **buckets;
	size_t nbuckets; /* a power of two */
	size_t count;
	void (*free_value)(void *);
};

static uint64_t fnv1a(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
	return h;
}

int strmap_open(struct strmap **out, void (*free_value)(void *))
{
	struct strmap *m = calloc(1, sizeof(*m));

	*out = NULL;
	if (!m)
		return -ENOMEM;
	m->nbuckets = 64;
	m->buckets = calloc(m->nbuckets, sizeof(*m->buckets));
	if (!m->buckets) {
		free(m);
		return -ENOMEM;
	}
	m->free_value = free_value;
	*out = m;
	return 0;
}

static void free_entry(struct strmap *m, struct entry *e)
{
	if (m->free_value)
		m->free_value(e->value);
	free(e);
}

void strmap_clear(struct strmap *m)
{
	for (size_t i = 0; i < m->nbuckets; i++) {
		for (struct entry *e = m->buckets[i], *next; e; e = next) {
			next = e->next;
			free_entry(m, e);
		}
		m->buckets[i] = NULL;
	}
	m->count = 0;
}

void strmap_close(struct strmap **map)
{
	if (!*map)
		return;
	strmap_clear(*map);
	free((*map)->buckets);
	free(*map);
	*map = NULL;
}

static struct entry **find(const struct strmap *m, const char *key, uint64_t h)
{
	struct entry **p = &m->buckets[h & (m->nbuckets - 1)];

	while (*p && ((*p)->hash != h || strcmp((*p)->key, key) != 0))
		p = &(*p)->next;
	return p;
}

void *strmap_get(const struct strmap *m, const char *key)
{
	struct entry *e = *find(m, key, fnv1a(key));
	return e ? e->value : NULL;
}

/* Double the table when the load passes one entry per bucket. */
static void grow(struct strmap *m)
{
	size_t n = m->nbuckets * 2;
	struct entry **b = calloc(n, sizeof(*b));

	if (!b)
		return; /* stay at the current size: slower, still correct */
	for (size_t i = 0; i < m->nbuckets; i++) {
		for (struct entry *e = m->buckets[i], *next; e; e = next) {
			next = e->next;
			e->next = b[e->hash & (n - 1)];
			b[e->hash & (n - 1)] = e;
		}
	}
	free(m->buckets);
	m->buckets = b;
	m->nbuckets = n;
}

bool strmap_put(struct strmap *m, const char *key, void *value)
{
	uint64_t h = fnv1a(key);
	struct entry **p = find(m, key, h), *e;
	size_t len;

	if (*p) {
		if (m->free_value && (*p)->value != value)
			m->free_value((*p)->value);
		(*p)->value = value;
		return true;
	}
	len = strlen(key);
	e = malloc(sizeof(*e) + len + 1);
	if (!e)
		return false;
	memcpy(e->key, key, len + 1);
	e->hash = h;
	e->value = value;
	e->next = NULL;
	*p = e;
	if (++m->count > m->nbuckets)
		grow(m);
	return true;
}

bool strmap_remove(struct strmap *m, const char *key)
{
	struct entry **p = find(m, key, fnv1a(key)), *e = *p;

	if (!e)
		return false;
	*p = e->next;
	free_entry(m, e);
	m->count--;
	return true;
}

size_t strmap_count(const struct strmap *m)
{
	return m->count;
}

void strmap_foreach(const struct strmap *m, void (*fn)(void *arg, const char *key, void *value),
		    void *arg)
{
	for (size_t i = 0; i < m->nbuckets; i++)
		for (const struct entry *e = m->buckets[i]; e; e = e->next)
			fn(arg, e->key, e->value);
}
