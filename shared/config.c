/* Configuration from the environment (DAYBOOK_*), checked once at start. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <event2/http.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "digest.h"

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

/* Percent-decode text (the user or the password of a URL that evhttp_uri_parse has
 * checked, so every '%' starts a valid escape) into out, a buffer of outlen bytes with
 * the NUL; false when it decodes to a NUL byte or does not fit. By evhttp_uridecode's
 * rule (a '%' and two hex digits are that byte, anything else, '+' too, is itself) but
 * not by it: its result is libevent's memory, which the command allocates with
 * evmem.h and free() must not see. */
static bool decode(const char *text, size_t n, char *out, size_t outlen)
{
	size_t len = 0;

	for (size_t i = 0; i < n; i++) {
		int hi = i + 1 < n && text[i] == '%' ? digest_hex_digit(text[i + 1]) : -1;
		int lo = hi >= 0 && i + 2 < n ? digest_hex_digit(text[i + 2]) : -1;
		char c = text[i];

		if (hi >= 0 && lo >= 0) {
			c = (char)(hi * 16 + lo);
			i += 2;
		}
		if (c == '\0' || len + 1 >= outlen)
			return false;
		out[len++] = c;
	}
	if (len >= outlen)
		return false;
	out[len] = '\0';
	return true;
}

/* "user[:password]" from the URL's userinfo, percent-decoded. */
static bool parse_userinfo(const char *userinfo, struct config_redis *out)
{
	const char *colon = strchr(userinfo, ':');

	if (!decode(userinfo, colon ? (size_t)(colon - userinfo) : strlen(userinfo), out->user,
		    sizeof(out->user)))
		return false;
	return !colon || decode(colon + 1, strlen(colon + 1), out->password, sizeof(out->password));
}

/* Is `userinfo` what a URL's userinfo may be? Checked by libevent's own parser, as
 * for redis:// URLs. */
static bool userinfo_ok(const char *userinfo)
{
	char probe[sizeof(((struct config_redis *)0)->user) * 3 +
		   sizeof(((struct config_redis *)0)->password) * 3 + 32];
	struct evhttp_uri *uri;
	const char *got;
	bool ok;

	if ((size_t)snprintf(probe, sizeof(probe), "redis://%s@h:1", userinfo) >= sizeof(probe))
		return false;
	uri = evhttp_uri_parse(probe);
	got = uri ? evhttp_uri_get_userinfo(uri) : NULL;
	ok = got && strcmp(got, userinfo) == 0;
	if (uri)
		evhttp_uri_free(uri);
	return ok;
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

/* After "redis-sentinel://": [userinfo@]sentinels/master[/db]. A list of hosts is no
 * URI authority, so libevent's parser cannot take it: the userinfo ends at the last '@'
 * before the first '/', and is decoded like any URL's. */
static bool parse_sentinel(const char *rest, struct config_redis *out)
{
	const char *slash = strchr(rest, '/'), *at = NULL, *name, *dbslash;
	char userinfo[sizeof(out->user) * 3 + sizeof(out->password) * 3 + 2];
	size_t n;

	if (!slash)
		return false;
	for (const char *q = rest; q < slash; q++)
		if (*q == '@')
			at = q;
	if (at) {
		n = (size_t)(at - rest);
		if (n >= sizeof(userinfo))
			return false;
		memcpy(userinfo, rest, n);
		userinfo[n] = '\0';
		/* The same userinfo rules as redis:// (RFC 3986, through libevent): a raw '@',
		 * a space or a stray '%' is refused here too, not taken as part of a password. */
		if (!userinfo_ok(userinfo) || !parse_userinfo(userinfo, out))
			return false;
		rest = at + 1;
	}
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

/* The URL is parsed by libevent (RFC 3986: userinfo, bracketed IPv6 hosts, ports);
 * this checks what Redis URLs allow on top of that. */
bool config_parse_redis(const char *url, struct config_redis *out)
{
	struct evhttp_uri *uri = evhttp_uri_parse(url);
	const char *scheme, *userinfo, *host, *path, *query;
	size_t n;
	bool ok = false;

	memset(out, 0, sizeof(*out));
	if (strncmp(url, "redis-sentinel://", 17) == 0) {
		ok = parse_sentinel(url + 17, out);
		goto done;
	}
	if (!uri)
		goto done;
	scheme = evhttp_uri_get_scheme(uri);
	userinfo = evhttp_uri_get_userinfo(uri);
	host = evhttp_uri_get_host(uri);
	path = evhttp_uri_get_path(uri);
	query = evhttp_uri_get_query(uri);
	if (!scheme || !host || !path || evhttp_uri_get_fragment(uri))
		goto done;
	if (userinfo && !parse_userinfo(userinfo, out))
		goto done;
	if (strcasecmp(scheme, "unix") == 0) {
		/* unix://[user[:password]@]/path[?db=N]: no host, no port, an absolute path */
		n = strlen(path);
		if (host[0] || evhttp_uri_get_port(uri) != -1 || path[0] != '/' ||
		    n >= sizeof(out->path))
			goto done;
		memcpy(out->path, path, n + 1);
		ok = !query || (strncmp(query, "db=", 3) == 0 && parse_db(query + 3, &out->db));
		goto done;
	}
	/* redis://[user[:password]@]host:port[/db], host a name, IPv4 or [IPv6] */
	if (strcasecmp(scheme, "redis") != 0 || query || evhttp_uri_get_port(uri) < 1 ||
	    evhttp_uri_get_port(uri) > 65535)
		goto done;
	n = strlen(host);
	if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
		host++;
		n -= 2;
	}
	if (n == 0 || n >= sizeof(out->host))
		goto done;
	memcpy(out->host, host, n);
	out->host[n] = '\0';
	out->port = (uint16_t)evhttp_uri_get_port(uri);
	ok = path[0] == '\0' || (path[0] == '/' && parse_db(path + 1, &out->db));
done:
	if (uri)
		evhttp_uri_free(uri);
	if (!ok)
		memset(out, 0, sizeof(*out)); /* no half-parsed password left behind */
	return ok;
}

void config_redis_describe(const struct config_redis *server, char *out, size_t len)
{
	const char *as = server->user[0] ? " as " : "";

	bool ipv6 = strchr(server->host, ':') != NULL;

	if (server->master[0])
		snprintf(out, len, "primary %s of Sentinels %s/%d%s%s", server->master,
			 server->sentinels, server->db, as, server->user);
	else if (server->path[0])
		snprintf(out, len, "unix:%s/%d%s%s", server->path, server->db, as, server->user);
	else
		snprintf(out, len, "%s%s%s:%u/%d%s%s", ipv6 ? "[" : "", server->host,
			 ipv6 ? "]" : "", (unsigned)server->port, server->db, as, server->user);
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
		snprintf(err, errlen,
			 "DAYBOOK_REDIS_PASSWORD_FILE: the password in %s is longer "
			 "than %zu bytes",
			 path, sizeof(server->password) - 2);
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

/* An optional unsigned setting in [min, max]; false (with err) when malformed. */
static bool env_uint(const char *name, unsigned min, unsigned max, unsigned *out, char *err,
		     size_t errlen)
{
	const char *v = env(name);
	unsigned long n = 0;
	size_t i = 0;

	if (!v)
		return true;
	for (; v[i] >= '0' && v[i] <= '9' && n <= max; i++)
		n = n * 10 + (unsigned long)(v[i] - '0');
	if (i == 0 || v[i] != '\0' || n < min || n > max) {
		snprintf(err, errlen, "%s is malformed: expected an integer from %u to %u", name,
			 min, max);
		return false;
	}
	*out = (unsigned)n;
	return true;
}

/* The HTTP edge's limits, defaults where unset. */
static bool load_http(struct config_http *h, char *err, size_t errlen)
{
	unsigned libevent_reads = 0;

	h->max_connections = CONFIG_MAX_CONNECTIONS_DEFAULT;
	h->header_timeout_ms = CONFIG_HEADER_TIMEOUT_MS_DEFAULT;
	h->idle_timeout_ms = CONFIG_IDLE_TIMEOUT_MS_DEFAULT;
	if (!env_uint("DAYBOOK_MAX_CONNECTIONS", 1, 1000000, &h->max_connections, err, errlen))
		return false;
	if (!env_uint("DAYBOOK_HTTP_HEADER_TIMEOUT_MS", 100, 600000, &h->header_timeout_ms, err,
		      errlen))
		return false;
	if (!env_uint("DAYBOOK_HTTP_IDLE_TIMEOUT_MS", 100, 3600000, &h->idle_timeout_ms, err,
		      errlen))
		return false;
	if (!env_uint("DAYBOOK_HTTP_LIBEVENT_READS", 0, 1, &libevent_reads, err, errlen))
		return false;
	h->libevent_reads = libevent_reads == 1;
	h->cors_origins = env("DAYBOOK_CORS_ORIGINS");
	if (h->cors_origins && !config_cors_origins_valid(h->cors_origins)) {
		snprintf(err, errlen,
			 "DAYBOOK_CORS_ORIGINS is malformed: expected origins such as "
			 "https://app.example.com (scheme, host, optional port; no path) or *, "
			 "separated by commas or spaces");
		return false;
	}
	return true;
}

bool config_cors_origins_valid(const char *list)
{
	size_t n = 0;

	for (const char *p = list; *p;) {
		size_t len = strcspn(p, ", "), scheme;
		const char *host;

		if (len > 0) {
			n++;
			if (len == 1 && *p == '*')
				goto next;
			scheme = strncmp(p, "https://", 8) == 0  ? 8
				 : strncmp(p, "http://", 7) == 0 ? 7
								 : 0;
			if (scheme == 0 || len == scheme)
				return false;
			for (host = p + scheme; host < p + len; host++)
				if (!((*host >= 'a' && *host <= 'z') ||
				      (*host >= 'A' && *host <= 'Z') ||
				      (*host >= '0' && *host <= '9') || strchr(".-:[]", *host)))
					return false; /* a path, a query, userinfo, a control byte */
		}
	next:
		p += len;
		p += strspn(p, ", ");
	}
	return n > 0;
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
		snprintf(err, errlen,
			 "DAYBOOK_PG is not set: give a libpq connection string or URI");
		return false;
	}
	if ((need & CONFIG_NEED_REDIS) && !cfg->redis_url) {
		snprintf(err, errlen,
			 "DAYBOOK_REDIS is not set: give redis://host:port[/db] or unix:///path");
		return false;
	}
	if (cfg->redis_url && !config_parse_redis(cfg->redis_url, &cfg->redis)) {
		snprintf(err, errlen,
			 "DAYBOOK_REDIS is malformed: expected "
			 "redis://[user[:password]@]host:port[/db], unix:///path or "
			 "redis-sentinel://[user[:password]@]host:port[,host:port...]/master[/db]");
		return false;
	}
	if (password_file && cfg->redis_url) {
		if (cfg->redis.password[0]) {
			snprintf(err, errlen,
				 "DAYBOOK_REDIS_PASSWORD_FILE is set but DAYBOOK_REDIS "
				 "holds a password too: give it in one place only");
			return false;
		}
		if (!config_read_redis_password(password_file, &cfg->redis, err, errlen))
			return false;
	}
	if ((need & CONFIG_NEED_TOKENS) && !cfg->tokens_file) {
		snprintf(err, errlen,
			 "DAYBOOK_TOKENS_FILE is not set: give the path of the API tokens file");
		return false;
	}
	if (level && !log_level_parse(level, &cfg->log_level)) {
		snprintf(err, errlen,
			 "DAYBOOK_LOG_LEVEL is malformed: expected debug, info, warn or error");
		return false;
	}
	if (!listen)
		listen = default_listen;
	if (listen && !config_parse_hostport(listen, cfg->listen_host, sizeof(cfg->listen_host),
					     &cfg->listen_port)) {
		snprintf(err, errlen, "DAYBOOK_LISTEN is malformed: expected host:port");
		return false;
	}
	return load_http(&cfg->http, err, errlen);
}
