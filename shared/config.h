/* Configuration from the environment (DAYBOOK_*), checked once at start. */
#ifndef DAYBOOK_CONFIG_H
#define DAYBOOK_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "log.h"

/* Which settings a binary requires; the others are read when present. */
enum config_need {
	CONFIG_NEED_PG = 1 << 0,
	CONFIG_NEED_REDIS = 1 << 1,
	CONFIG_NEED_TOKENS = 1 << 2,
};

struct config_redis {
	char host[256]; /* empty for a unix socket; IPv6 without brackets */
	uint16_t port;
	char path[256]; /* unix socket path, empty for TCP */
	int db;
	/* AUTH: the ACL user (empty: AUTH with the password alone, as the `default` user)
	 * and the password (empty: no AUTH). Never logged: see config_redis_describe. */
	char user[128];
	char password[512];
	/* Sentinel discovery (redis-sentinel://): the Sentinels, "host:port[,host:port...]",
	 * and the name they know the primary by; both empty for a fixed server. host and
	 * port then hold the primary found last (see redis_sentinel_resolve). */
	char sentinels[512];
	char master[128];
};

/* The HTTP edge's limits, per process (see docs/configuration.md). */
struct config_http {
	unsigned max_connections;   /* DAYBOOK_MAX_CONNECTIONS: open client connections */
	unsigned header_timeout_ms; /* DAYBOOK_HTTP_HEADER_TIMEOUT_MS: to receive a request */
	unsigned idle_timeout_ms;   /* DAYBOOK_HTTP_IDLE_TIMEOUT_MS: keep-alive between requests */
	/* DAYBOOK_HTTP_LIBEVENT_READS=1: connections are read by libevent's own read path,
	 * without the edge's shortcuts into libevent's internals (http_conn.c) */
	bool libevent_reads;
	/* DAYBOOK_CORS_ORIGINS: origins ("https://app.example" or "*") separated by commas
	 * and/or spaces, checked by config_cors_origins_valid; NULL (unset): CORS off. */
	const char *cors_origins;
};

/* An idle connection costs a few KiB, one receiving a request up to 80 KiB (16 KiB of
 * headers, 64 KiB of body): 512 keeps the worst case within about 40 MiB. */
#define CONFIG_MAX_CONNECTIONS_DEFAULT 512
#define CONFIG_HEADER_TIMEOUT_MS_DEFAULT 10000
#define CONFIG_IDLE_TIMEOUT_MS_DEFAULT 60000
/* Descriptors a service keeps for everything but client sockets (PostgreSQL, Redis,
 * files): the connection cap (and the query service's stream cap) fit below the rest. */
#define CONFIG_FD_HEADROOM 64

/* Strings point into the environment and live as long as the process. */
struct config {
	const char *pg;        /* DAYBOOK_PG, libpq conninfo or URI */
	const char *redis_url; /* DAYBOOK_REDIS, NULL when unset */
	struct config_redis redis;
	char listen_host[256]; /* DAYBOOK_LISTEN */
	uint16_t listen_port;
	const char *tokens_file; /* DAYBOOK_TOKENS_FILE, NULL when unset */
	enum log_level log_level;
	struct config_http http;
};

/* Read and check every DAYBOOK_* setting. `default_listen` is "host:port" or NULL for
 * a binary without a listener. On failure writes one line naming the variable into
 * err and returns false; the caller prints it and exits 2. */
bool config_load(struct config *cfg, unsigned need, const char *default_listen, char *err,
		 size_t errlen) __attribute__((warn_unused_result));

/* The Redis server for logs and messages: "host:port/db" or "unix:/path/db", with the
 * user when there is one ("as daybook-query") and never the password. */
void config_redis_describe(const struct config_redis *server, char *out, size_t len);
/* The password from a file (DAYBOOK_REDIS_PASSWORD_FILE): the first line, without its
 * newline. False with one line in err when unreadable, empty or too long. */
bool config_read_redis_password(const char *path, struct config_redis *server, char *err,
				size_t errlen) __attribute__((warn_unused_result));

/* A DAYBOOK_CORS_ORIGINS value: one or more of "*" or scheme://host[:port] (http or
 * https, no path), separated by commas and/or spaces. */
bool config_cors_origins_valid(const char *list) __attribute__((warn_unused_result));

/* "host:port" → parts; false when malformed or the port is not 1-65535. */
bool config_parse_hostport(const char *text, char *host, size_t hostlen, uint16_t *port)
	__attribute__((warn_unused_result));
/* redis://[[user][:password]@]host:port[/db] or unix://[[user][:password]@]/path[?db=N]
 * (parsed by libevent's evhttp_uri_parse; user and password percent-decoded; host a
 * name, IPv4 or a bracketed IPv6 address, stored without the brackets), or
 * redis-sentinel://[[user][:password]@]host:port[,host:port...]/master[/db] (the user
 * and password are the Redis server's, the Sentinels take none); false when malformed. */
bool config_parse_redis(const char *url, struct config_redis *out)
	__attribute__((warn_unused_result));

#endif
