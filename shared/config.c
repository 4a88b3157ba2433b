/* Configuration from the environment (DAYBOOK_*), checked once at start. */
#include "config.h"

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

bool config_parse_redis(const char *url, struct config_redis *out)
{
	char hostport[300];
	const char *rest, *slash;

	memset(out, 0, sizeof(*out));
	if (strncmp(url, "unix://", 7) == 0) {
		const char *q = strstr(url + 7, "?db=");
		size_t n = q ? (size_t)(q - (url + 7)) : strlen(url + 7);
		if (n == 0 || n >= sizeof(out->path) || url[7] != '/')
			return false;
		memcpy(out->path, url + 7, n);
		return !q || parse_db(q + 4, &out->db);
	}
	if (strncmp(url, "redis://", 8) != 0)
		return false;
	rest = url + 8;
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

static const char *env(const char *name)
{
	const char *v = getenv(name);
	return v && *v ? v : NULL;
}

bool config_load(struct config *cfg, unsigned need, const char *default_listen, char *err,
		 size_t errlen)
{
	const char *listen = env("DAYBOOK_LISTEN"), *level = env("DAYBOOK_LOG_LEVEL");

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
		snprintf(err, errlen, "DAYBOOK_REDIS is malformed: expected redis://host:port[/db] or unix:///path");
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
