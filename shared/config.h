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
	char host[256];  /* empty for a unix socket */
	uint16_t port;
	char path[256];  /* unix socket path, empty for TCP */
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

/* Strings point into the environment and live as long as the process. */
struct config {
	const char *pg;          /* DAYBOOK_PG, libpq conninfo or URI */
	const char *redis_url;   /* DAYBOOK_REDIS, NULL when unset */
	struct config_redis redis;
	char listen_host[256];   /* DAYBOOK_LISTEN */
	uint16_t listen_port;
	const char *tokens_file; /* DAYBOOK_TOKENS_FILE, NULL when unset */
	enum log_level log_level;
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

/* "host:port" → parts; false when malformed or the port is not 1-65535. */
bool config_parse_hostport(const char *text, char *host, size_t hostlen, uint16_t *port)
	__attribute__((warn_unused_result));
/* redis://[[user][:password]@]host:port[/db] or unix://[[user][:password]@]/path[?db=N]
 * or redis-sentinel://[[user][:password]@]host:port[,host:port...]/master[/db] (user and
 * password percent-decoded; they are the Redis server's, the Sentinels take none);
 * false when malformed. */
bool config_parse_redis(const char *url, struct config_redis *out) __attribute__((warn_unused_result));

#endif
