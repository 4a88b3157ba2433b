/* Configuration from the environment (DAYBOOK_*), checked once at start. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool parse_port(const char *text, uint16_t *port)
{
	char *end;
	long v;

	if (*text < '0' || *text > '9')
		return false; /* no sign, no space */
	errno = 0;
	v = strtol(text, &end, 10);
	if (errno || end == text || *end || v < 1 || v > 65535)
		return false;
	*port = (uint16_t)v;
	return true;
}

bool config_parse_hostport(const char *text, char *host, size_t hostlen, uint16_t *port)
{
	const char *colon = strrchr(text, ':');
	size_t n;

	if (!colon || colon == text)
		return false;
	n = (size_t)(colon - text);
	if (n >= hostlen)
		return false;
	memcpy(host, text, n);
	host[n] = '\0';
	return parse_port(colon + 1, port);
}

static bool parse_db(const char *text, int *db)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(text, &end, 10);
	if (errno || end == text || *end || v < 0 || v > 1000000)
		return false;
	*db = (int)v;
	return true;
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Percent-decode text[0, n) into out (outlen bytes with the NUL); false when malformed
 * or too long. */
static bool decode(const char *text, size_t n, char *out, size_t outlen)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		int c = (unsigned char)text[i];
		if (c == '%') {
			int hi, lo;
			if (i + 2 >= n)
				return false;
			hi = hex_digit(text[i + 1]);
			lo = hex_digit(text[i + 2]);
			if (hi < 0 || lo < 0)
				return false;
			c = hi * 16 + lo;
			i += 2;
		}
		if (c == 0 || o + 1 >= outlen)
			return false;
		out[o++] = (char)c;
	}
	out[o] = '\0';
	return true;
}

/* "[user][:password]@" at the start of *rest, if any: decoded into out, and *rest moved
 * past it. The userinfo ends at the last '@' before the first '/'. */
static bool parse_userinfo(const char **rest, struct config_redis *out)
{
	const char *p = *rest, *slash = strchr(p, '/'), *at = NULL, *colon;

	for (const char *q = p; *q && (!slash || q < slash); q++)
		if (*q == '@')
			at = q;
	if (!at)
		return true;
	colon = memchr(p, ':', (size_t)(at - p));
	if (!decode(p, (size_t)((colon ? colon : at) - p), out->user, sizeof(out->user)))
		return false;
	if (colon && !decode(colon + 1, (size_t)(at - colon - 1), out->password,
			     sizeof(out->password)))
		return false;
	*rest = at + 1;
	return true;
}

/* The Sentinels' "host:port[,host:port...]" of length n: each one well-formed. */
static bool sentinels_ok(const char *list, size_t n)
{
	char one[300], host[256];
	uint16_t port;
	const char *p = list, *end = list + n, *comma;

	if (n == 0)
		return false;
	while (p <= end) {
		comma = memchr(p, ',', (size_t)(end - p));
		if (!comma)
			comma = end;
		if ((size_t)(comma - p) >= sizeof(one))
			return false;
		memcpy(one, p, (size_t)(comma - p));
		one[comma - p] = '\0';
		if (!config_parse_hostport(one, host, sizeof(host), &port))
			return false;
		p = comma + 1;
	}
	return true;
}

/* After "redis-sentinel://": [userinfo@]sentinels/master[/db]. */
static bool parse_sentinel(const char *rest, struct config_redis *out)
{
	const char *slash, *name, *dbslash;
	size_t n;

	if (!parse_userinfo(&rest, out))
		return false;
	slash = strchr(rest, '/');
	if (!slash)
		return false;
	n = (size_t)(slash - rest);
	if (n >= sizeof(out->sentinels) || !sentinels_ok(rest, n))
		return false;
	memcpy(out->sentinels, rest, n);
	name = slash + 1;
	dbslash = strchr(name, '/');
	n = dbslash ? (size_t)(dbslash - name) : strlen(name);
	if (n == 0 || n >= sizeof(out->master))
		return false;
	for (size_t i = 0; i < n; i++)
		if (!(isalnum((unsigned char)name[i]) || strchr("-_.", name[i])))
			return false;
	memcpy(out->master, name, n);
	return !dbslash || parse_db(dbslash + 1, &out->db);
}

bool config_parse_redis(const char *url, struct config_redis *out)
{
	char hostport[300];
	const char *rest, *slash, *q;
	size_t n;

	memset(out, 0, sizeof(*out));
	if (strncmp(url, "unix://", 7) == 0) {
		rest = url + 7;
		if (*rest != '/' && !parse_userinfo(&rest, out))
			return false;
		q = strstr(rest, "?db=");
		n = q ? (size_t)(q - rest) : strlen(rest);
		if (n == 0 || n >= sizeof(out->path) || rest[0] != '/')
			return false;
		memcpy(out->path, rest, n);
		return !q || parse_db(q + 4, &out->db);
	}
	if (strncmp(url, "redis-sentinel://", 17) == 0)
		return parse_sentinel(url + 17, out);
	if (strncmp(url, "redis://", 8) != 0)
		return false;
	rest = url + 8;
	if (!parse_userinfo(&rest, out))
		return false;
	slash = strchr(rest, '/');
	if (slash) {
		if ((size_t)(slash - rest) >= sizeof(hostport) || !parse_db(slash + 1, &out->db))
			return false;
		memcpy(hostport, rest, (size_t)(slash - rest));
		hostport[slash - rest] = '\0';
	} else {
		if (strlen(rest) >= sizeof(hostport))
			return false;
		strcpy(hostport, rest);
	}
	return config_parse_hostport(hostport, out->host, sizeof(out->host), &out->port);
}

void config_redis_describe(const struct config_redis *server, char *out, size_t len)
{
	const char *as = server->user[0] ? " as " : "";

	if (server->master[0])
		snprintf(out, len, "primary %s of Sentinels %s/%d%s%s", server->master,
			 server->sentinels, server->db, as, server->user);
	else if (server->path[0])
		snprintf(out, len, "unix:%s/%d%s%s", server->path, server->db, as, server->user);
	else
		snprintf(out, len, "%s:%u/%d%s%s", server->host, (unsigned)server->port, server->db,
			 as, server->user);
}

bool config_read_redis_password(const char *path, struct config_redis *server, char *err,
				size_t errlen)
{
	/* The Redis password, kept out of the environment and the process list. */
	FILE *f = fopen(path, "r");
	size_t n;

	if (!f) {
		snprintf(err, errlen, "DAYBOOK_REDIS_PASSWORD_FILE: cannot read %s: %s", path,
			 strerror(errno));
		return false;
	}
	if (!fgets(server->password, sizeof(server->password), f))
		server->password[0] = '\0';
	fclose(f);
	n = strcspn(server->password, "\r\n");
	if (server->password[n] == '\0' && n == sizeof(server->password) - 1) {
		snprintf(err, errlen, "DAYBOOK_REDIS_PASSWORD_FILE: the password in %s is longer "
			 "than %zu bytes", path, sizeof(server->password) - 2);
		goto fail;
	}
	server->password[n] = '\0';
	if (n == 0) {
		snprintf(err, errlen, "DAYBOOK_REDIS_PASSWORD_FILE: %s holds no password", path);
		goto fail;
	}
	return true;
fail:
	memset(server->password, 0, sizeof(server->password));
	return false;
}

static const char *env(const char *name)
{
	const char *v = getenv(name);
	return v && *v ? v : NULL;
}

bool config_load(struct config *cfg, unsigned need, const char *default_listen, char *err,
		 size_t errlen)
{
	const char *listen = env("DAYBOOK_LISTEN"), *level = env("DAYBOOK_LOG_LEVEL");
	const char *password_file = env("DAYBOOK_REDIS_PASSWORD_FILE");

	memset(cfg, 0, sizeof(*cfg));
	cfg->pg = env("DAYBOOK_PG");
	cfg->redis_url = env("DAYBOOK_REDIS");
	cfg->tokens_file = env("DAYBOOK_TOKENS_FILE");
	cfg->log_level = LOG_INFO;
	if ((need & CONFIG_NEED_PG) && !cfg->pg) {
		snprintf(err, errlen, "DAYBOOK_PG is not set: give a libpq connection string or URI");
		return false;
	}
	if ((need & CONFIG_NEED_REDIS) && !cfg->redis_url) {
		snprintf(err, errlen, "DAYBOOK_REDIS is not set: give redis://host:port[/db] or unix:///path");
		return false;
	}
	if (cfg->redis_url && !config_parse_redis(cfg->redis_url, &cfg->redis)) {
		snprintf(err, errlen, "DAYBOOK_REDIS is malformed: expected "
			 "redis://[user[:password]@]host:port[/db], unix:///path or "
			 "redis-sentinel://[user[:password]@]host:port[,host:port...]/master[/db]");
		return false;
	}
	if (password_file && cfg->redis_url) {
		if (cfg->redis.password[0]) {
			snprintf(err, errlen, "DAYBOOK_REDIS_PASSWORD_FILE is set but DAYBOOK_REDIS "
				 "holds a password too: give it in one place only");
			return false;
		}
		if (!config_read_redis_password(password_file, &cfg->redis, err, errlen))
			return false;
	}
	if ((need & CONFIG_NEED_TOKENS) && !cfg->tokens_file) {
		snprintf(err, errlen, "DAYBOOK_TOKENS_FILE is not set: give the path of the API tokens file");
		return false;
	}
	if (level && !log_level_parse(level, &cfg->log_level)) {
		snprintf(err, errlen, "DAYBOOK_LOG_LEVEL is malformed: expected debug, info, warn or error");
		return false;
	}
	if (!listen)
		listen = default_listen;
	if (listen && !config_parse_hostport(listen, cfg->listen_host, sizeof(cfg->listen_host),
					     &cfg->listen_port)) {
		snprintf(err, errlen, "DAYBOOK_LISTEN is malformed: expected host:port");
		return false;
	}
	return true;
}
