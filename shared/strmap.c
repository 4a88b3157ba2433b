/* A string-keyed hash map (open hashing, SipHash-1-3 keyed per map), for caches and sets. */
#include "strmap.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

struct entry {
	struct entry *next;
	void *value;
	uint64_t hash;
	uint32_t room; /* bytes for the key, its NUL included */
	char key[];
};

/* Removed entries kept for the next puts: the maps a batch fills and clears each time
 * (the command's overlay and transfer ids) would otherwise allocate and free an entry per
 * key per batch, more than malloc's per-thread cache holds. */
#define SPARE_MAX 1024
/* Keys get room in steps of this: a spare fits most keys of a similar length. */
#define KEY_ROOM_STEP 16

struct strmap {
	struct entry **buckets;
	size_t nbuckets; /* a power of two */
	size_t count;
	void (*free_value)(void *);
	uint64_t k0, k1;     /* the SipHash key: random, the map's own */
	struct entry *spare; /* removed entries, for reuse */
	size_t nspare;
};

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

static void sipround(uint64_t v[4])
{
	v[0] += v[1];
	v[1] = ROTL(v[1], 13);
	v[1] ^= v[0];
	v[0] = ROTL(v[0], 32);
	v[2] += v[3];
	v[3] = ROTL(v[3], 16);
	v[3] ^= v[2];
	v[0] += v[3];
	v[3] = ROTL(v[3], 21);
	v[3] ^= v[0];
	v[2] += v[1];
	v[1] = ROTL(v[1], 17);
	v[1] ^= v[2];
	v[2] = ROTL(v[2], 32);
}

static uint64_t load_le(const unsigned char *p, size_t n)
{
	uint64_t w = 0;

	if (n == 8) { /* a whole word: on a little-endian host, one load */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
		memcpy(&w, p, 8);
		return w;
#endif
	}
	for (size_t i = 0; i < n; i++)
		w |= (uint64_t)p[i] << (8 * i);
	return w;
}

uint64_t strmap_siphash(uint64_t k0, uint64_t k1, const void *data, size_t len, int crounds,
			int drounds)
{
	const unsigned char *p = data;
	uint64_t v[4] = { k0 ^ 0x736f6d6570736575ULL, k1 ^ 0x646f72616e646f6dULL,
			  k0 ^ 0x6c7967656e657261ULL, k1 ^ 0x7465646279746573ULL };
	uint64_t m;
	size_t i;

	for (i = 0; i + 8 <= len; i += 8) {
		m = load_le(p + i, 8);
		v[3] ^= m;
		for (int r = 0; r < crounds; r++)
			sipround(v);
		v[0] ^= m;
	}
	m = load_le(p + i, len - i) | ((uint64_t)(len & 0xff) << 56);
	v[3] ^= m;
	for (int r = 0; r < crounds; r++)
		sipround(v);
	v[0] ^= m;
	v[2] ^= 0xff;
	for (int r = 0; r < drounds; r++)
		sipround(v);
	return v[0] ^ v[1] ^ v[2] ^ v[3];
}

/* Keys are chosen by clients (account ids, idempotency keys): with a public hash
 * function they could send keys that all share a bucket and turn every lookup into a
 * list walk. A random key per map makes the buckets unpredictable. */
static uint64_t hash(const struct strmap *m, const char *key)
{
	return strmap_siphash(m->k0, m->k1, key, strlen(key), 1, 3);
}

uint64_t strmap_hash(const struct strmap *m, const char *key)
{
	return hash(m, key);
}

/* 16 random bytes for the map's key; getrandom blocks only before the kernel's pool
 * is first initialised, long before any service starts. */
static int seed(struct strmap *m)
{
	unsigned char b[16];
	size_t got = 0;

	while (got < sizeof(b)) {
		ssize_t n = getrandom(b + got, sizeof(b) - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		got += (size_t)n;
	}
	m->k0 = load_le(b, 8);
	m->k1 = load_le(b + 8, 8);
	return 0;
}

int strmap_open(struct strmap **out, void (*free_value)(void *))
{
	struct strmap *m = calloc(1, sizeof(*m));
	int rc;

	*out = NULL;
	if (!m)
		return -ENOMEM;
	rc = seed(m);
	if (rc) {
		free(m);
		return rc;
	}
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
	if (m->nspare >= SPARE_MAX) {
		free(e);
		return;
	}
	e->next = m->spare;
	m->spare = e;
	m->nspare++;
}

/* An entry with room for a key of len bytes (and its NUL): a spare one if the first fits,
 * else a new one. NULL when out of memory. */
static struct entry *new_entry(struct strmap *m, size_t len)
{
	struct entry *e = m->spare;
	size_t room;

	if (e && e->room > len) {
		m->spare = e->next;
		m->nspare--;
		return e;
	}
	if (len >= UINT32_MAX - KEY_ROOM_STEP)
		return NULL;
	room = (len + KEY_ROOM_STEP) / KEY_ROOM_STEP * KEY_ROOM_STEP;
	e = malloc(sizeof(*e) + room);
	if (e)
		e->room = (uint32_t)room;
	return e;
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
	while ((*map)->spare) {
		struct entry *e = (*map)->spare;
		(*map)->spare = e->next;
		free(e);
	}
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

void strmap_prefetch(const struct strmap *m, uint64_t key_hash, int stage)
{
	struct entry *const *b = &m->buckets[key_hash & (m->nbuckets - 1)];

	if (stage == 0)
		__builtin_prefetch(b);
	else if (*b)
		__builtin_prefetch(*b);
}

void *strmap_get(const struct strmap *m, const char *key)
{
	struct entry *e = *find(m, key, hash(m, key));
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
	uint64_t h = hash(m, key);
	struct entry **p = find(m, key, h), *e;
	size_t len;

	if (*p) {
		if (m->free_value && (*p)->value != value)
			m->free_value((*p)->value);
		(*p)->value = value;
		return true;
	}
	len = strlen(key);
	e = new_entry(m, len);
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
	struct entry **p = find(m, key, hash(m, key)), *e = *p;

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
