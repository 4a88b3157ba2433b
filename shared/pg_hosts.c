/* A connection string's host list, for pg.c to start a connection attempt at any of its
 * hosts: libpq always starts at the first one (see pg_internal.h). */
#include "pg_internal.h"

#include <errno.h>
#include <libpq-fe.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* A comma-separated list, split as libpq splits it (no quoting, no trimming): the
 * items point into one copy, which the first item starts. */
struct list {
	char **item;
	size_t n;
};

struct pg_hosts {
	PQconninfoOption *opts; /* the parsed string */
	struct list host, hostaddr, port;
	size_t n;
	/* What pg_hosts_params built last. */
	const char **keys, **values;
	char *rotated[3];
};

static const char *const listed[] = { "host", "hostaddr", "port" };

static bool split(const char *s, struct list *out)
{
	char *copy = strdup(s), *p;
	size_t n = 1;

	if (!copy)
		return false;
	for (p = copy; *p; p++)
		n += *p == ',';
	out->item = malloc(n * sizeof(*out->item));
	if (!out->item) {
		free(copy);
		return false;
	}
	out->item[0] = copy;
	out->n = 1;
	for (p = copy; *p; p++)
		if (*p == ',') {
			*p = '\0';
			out->item[out->n++] = p + 1;
		}
	return true;
}

static void list_free(struct list *l)
{
	if (l->item)
		free(l->item[0]);
	free(l->item);
	*l = (struct list){ 0 };
}

/* The list's items from `first` on, then those before it, joined by commas again. */
static char *rotate(const struct list *l, size_t first)
{
	size_t len = 0;
	char *out, *p;

	for (size_t i = 0; i < l->n; i++)
		len += strlen(l->item[i]) + 1;
	out = malloc(len);
	if (!out)
		return NULL;
	p = out;
	for (size_t k = 0; k < l->n; k++) {
		const char *item = l->item[(first + k) % l->n];
		size_t n = strlen(item);
		memcpy(p, item, n);
		p += n;
		*p++ = k + 1 < l->n ? ',' : '\0';
	}
	return out;
}

static struct list *list_of(struct pg_hosts *h, const char *keyword)
{
	if (strcmp(keyword, "host") == 0)
		return &h->host;
	if (strcmp(keyword, "hostaddr") == 0)
		return &h->hostaddr;
	if (strcmp(keyword, "port") == 0)
		return &h->port;
	return NULL;
}

/* libpq's own rules: as many hostaddrs as hosts when both are given, and one port or
 * one per host. */
static bool consistent(const struct pg_hosts *h)
{
	if (h->host.n && h->hostaddr.n && h->host.n != h->hostaddr.n)
		return false;
	return h->port.n <= 1 || h->port.n == h->n;
}

struct pg_hosts *pg_hosts_parse(const char *conninfo)
{
	struct pg_hosts *h = calloc(1, sizeof(*h));

	if (!h || !(h->opts = PQconninfoParse(conninfo, NULL)))
		goto fail;
	for (PQconninfoOption *o = h->opts; o->keyword; o++) {
		struct list *l = o->val ? list_of(h, o->keyword) : NULL;
		if (l && !split(o->val, l))
			goto fail;
	}
	h->n = h->host.n ? h->host.n : h->hostaddr.n;
	if (h->n < 2 || !consistent(h))
		goto fail;
	return h;
fail:
	pg_hosts_free(&h);
	return NULL;
}

void pg_hosts_free(struct pg_hosts **hp)
{
	struct pg_hosts *h = *hp;

	if (!h)
		return;
	PQconninfoFree(h->opts);
	list_free(&h->host);
	list_free(&h->hostaddr);
	list_free(&h->port);
	free(h->keys);
	free(h->values);
	for (size_t i = 0; i < 3; i++)
		free(h->rotated[i]);
	free(h);
	*hp = NULL;
}

size_t pg_hosts_count(const struct pg_hosts *h)
{
	return h->n;
}

double pg_hosts_timeout(const struct pg_hosts *h, double fallback)
{
	for (const PQconninfoOption *o = h->opts; o->keyword; o++) {
		char *end;
		long secs;

		if (!o->val || strcmp(o->keyword, "connect_timeout") != 0)
			continue;
		errno = 0;
		secs = strtol(o->val, &end, 10);
		end += strspn(end, " \t\n\r\f\v");
		if (errno || end == o->val || *end || secs <= 0 || secs > INT_MAX)
			return fallback;
		return secs < 2 ? 2 : (double)secs;
	}
	return fallback;
}

static bool matches(const struct pg_hosts *h, size_t i, const char *host, const char *port)
{
	const char *name = h->host.n && h->host.item[i][0] ? h->host.item[i]
			   : h->hostaddr.n                 ? h->hostaddr.item[i]
							   : "";
	const char *p = h->port.n ? h->port.item[h->port.n == 1 ? 0 : i] : "";

	return (!name[0] || strcmp(name, host ? host : "") == 0) &&
	       (!p[0] || strcmp(p, port ? port : "") == 0);
}

size_t pg_hosts_find(const struct pg_hosts *h, size_t first, size_t from, const char *host,
		     const char *port)
{
	for (size_t at = from; at < h->n; at++)
		if (matches(h, (first + at) % h->n, host, port))
			return at;
	return h->n;
}

bool pg_hosts_params(struct pg_hosts *h, size_t first, const char *const *defaults,
		     const char *const *defaults_values, const char *const **keys,
		     const char *const **values)
{
	size_t n = 0, cap = 1;

	for (size_t i = 0; defaults[i]; i++)
		cap++;
	for (const PQconninfoOption *o = h->opts; o->keyword; o++)
		cap += o->val != NULL;
	free(h->keys);
	free(h->values);
	h->keys = malloc(cap * sizeof(*h->keys));
	h->values = malloc(cap * sizeof(*h->values));
	if (!h->keys || !h->values)
		return false;
	for (size_t i = 0; defaults[i]; i++, n++) {
		h->keys[n] = defaults[i];
		h->values[n] = defaults_values[i];
	}
	for (const PQconninfoOption *o = h->opts; o->keyword; o++) {
		if (!o->val)
			continue;
		h->keys[n] = o->keyword;
		h->values[n++] = o->val;
	}
	for (size_t i = 0; i < 3; i++) {
		const struct list *l = list_of(h, listed[i]);
		free(h->rotated[i]);
		h->rotated[i] = NULL;
		if (l->n < 2)
			continue; /* absent, or one port for every host */
		if (!(h->rotated[i] = rotate(l, first % l->n)))
			return false;
		for (size_t k = 0; k < n; k++)
			if (strcmp(h->keys[k], listed[i]) == 0)
				h->values[k] = h->rotated[i];
	}
	h->keys[n] = h->values[n] = NULL;
	*keys = h->keys;
	*values = h->values;
	return true;
}
