/* Internals of the PostgreSQL connection (pg.c), for its tests: a connection string's
 * host list, parsed once, from which each connection attempt starts at a chosen host. */
#ifndef DAYBOOK_PG_INTERNAL_H
#define DAYBOOK_PG_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>

struct pg_hosts;

/* conninfo (key=value or a postgresql:// URI) when it names two hosts or more, in
 * `host` and/or `hostaddr`, with one port for all or one each. NULL otherwise (one
 * host, hosts from the environment or a service file, a plain database name, a string
 * libpq would refuse) or when out of memory: libpq then reads the string as it is. Free
 * with pg_hosts_free. */
struct pg_hosts *pg_hosts_parse(const char *conninfo) __attribute__((warn_unused_result));
void pg_hosts_free(struct pg_hosts **h);
/* How many hosts the string names (at least 2). */
size_t pg_hosts_count(const struct pg_hosts *h);
/* Seconds one host may take to connect: the string's connect_timeout (at least 2, as
 * libpq rounds it), or `fallback` when it has none (or 0, or a value libpq would not
 * take). */
double pg_hosts_timeout(const struct pg_hosts *h, double fallback);
/* The position, in the order that starts at host `first`, of the first host at
 * position `from` or later whose name (host, else hostaddr) and port are what libpq's
 * PQhost and PQport say; pg_hosts_count when none is. An empty name or port in the
 * string (libpq's default) matches any. */
size_t pg_hosts_find(const struct pg_hosts *h, size_t first, size_t from, const char *host,
		     const char *port);
/* Keyword and value arrays for PQconnectStartParams(keys, values, 0): the NULL-terminated
 * `defaults` (keys) and `defaults_values` first, then every setting of the string (which
 * so override the defaults), with the host, hostaddr and port lists rotated alike to start
 * at host `first` (a single port stays as it is). Both arrays are the hosts' and valid
 * until the next call or pg_hosts_free; false when out of memory. */
bool pg_hosts_params(struct pg_hosts *h, size_t first, const char *const *defaults,
		     const char *const *defaults_values, const char *const **keys,
		     const char *const **values) __attribute__((warn_unused_result));

#endif
