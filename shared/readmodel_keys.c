/* The Redis key layout of the read models: every key of a generation is made here. */
#include "readmodel.h"

#include <stdlib.h>
#include <string.h>

/* Append n bytes of s at *at, as far as len - 1 allows; *at counts them all. */
static void put(char *out, size_t len, size_t *at, const char *s, size_t n)
{
	if (len > 0 && *at < len - 1) {
		size_t room = len - 1 - *at;
		memcpy(out + *at, s, n < room ? n : room);
	}
	*at += n;
}

static size_t key_of(char *out, size_t len, const char *gen, size_t gen_len, const char *kind,
		     const char *id)
{
	size_t at = 0;

	put(out, len, &at, READMODEL_GEN_PREFIX, sizeof(READMODEL_GEN_PREFIX) - 1);
	put(out, len, &at, gen, gen_len);
	put(out, len, &at, ":", 1);
	put(out, len, &at, kind, strlen(kind));
	if (id) {
		put(out, len, &at, ":", 1);
		put(out, len, &at, id, strlen(id));
	}
	if (len > 0)
		out[at < len - 1 ? at : len - 1] = '\0';
	return at;
}

/* Decimal text of v, without printf: keys are made for every item written. */
static size_t gen_text(long long v, char out[24])
{
	char tmp[24];
	size_t n = 0, i = 0;
	unsigned long long u = v < 0 ? -(unsigned long long)v : (unsigned long long)v;

	do {
		tmp[n++] = (char)('0' + (int)(u % 10));
		u /= 10;
	} while (u);
	if (v < 0)
		out[i++] = '-';
	while (n)
		out[i++] = tmp[--n];
	out[i] = '\0';
	return i;
}

size_t readmodel_key(char *out, size_t len, long long gen, const char *kind, const char *id)
{
	char g[24];
	size_t n = gen_text(gen, g);

	return key_of(out, len, g, n, kind, id);
}

size_t readmodel_key_text(char *out, size_t len, const char *gen, const char *kind, const char *id)
{
	return key_of(out, len, gen, strlen(gen), kind, id);
}

size_t readmodel_key_match(char *out, size_t len, long long gen)
{
	return readmodel_key(out, len, gen, "*", NULL);
}

long long readmodel_key_generation(const char *key)
{
	const size_t n = sizeof(READMODEL_GEN_PREFIX) - 1;
	char *end = NULL;
	long long gen;

	if (!key || strncmp(key, READMODEL_GEN_PREFIX, n) != 0 || key[n] < '0' || key[n] > '9')
		return 0;
	gen = strtoll(key + n, &end, 10);
	return end && *end == ':' ? gen : 0;
}
