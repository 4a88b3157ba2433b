/* Unit tests of the shared library's small modules: digest, tokens, config, strmap,
 * metrics, log, the pg text[] literal helper and host lists, the read models' time
 * text, the HTTP query-string parser and what the HTTP edge's read path assumes of
 * libevent. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "digest.h"
#include "evmem.h"
#include "http_internal.h"
#include "log.h"
#include "metrics.h"
#include "pg.h"
#include "pg_internal.h"
#include "readmodel.h"
#include "redis.h"
#include "service.h"
#include "strmap.h"
#include "tokens.h"

/* --- digest (libcrypto) ------------------------------------------------------------ */

static void assert_digest(const void *data, size_t len, const char *expected)
{
	unsigned char d[DIGEST_SHA256_LEN];
	char hex[DIGEST_SHA256_HEX_LEN + 1];

	cr_assert(digest_sha256(data, len, d));
	digest_hex(d, DIGEST_SHA256_LEN, hex);
	cr_assert_str_eq(hex, expected, "SHA-256 of %zu bytes", len);
}

Test(digest, sha256_gives_the_published_digests)
{
	assert_digest("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
	assert_digest("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

Test(digest, parts_hash_like_their_concatenation)
{
	const void *parts[] = { "ab", "", "c" };
	const size_t lens[] = { 2, 0, 1 };
	unsigned char whole[DIGEST_SHA256_LEN], parted[DIGEST_SHA256_LEN];

	cr_assert(digest_sha256("abc", 3, whole));
	cr_assert(digest_sha256_parts(3, parts, lens, parted));
	cr_assert_arr_eq(whole, parted, sizeof(whole));
}

Test(digest, equal_compares_every_byte)
{
	cr_assert(digest_equal("abcd", "abcd", 4));
	cr_assert_not(digest_equal("abcd", "abce", 4));
	cr_assert_not(digest_equal("xbcd", "abcd", 4));
	cr_assert(digest_equal("ab", "ac", 1), "only len bytes count");
}

/* --- tokens ------------------------------------------------------------------------ */

/* A temporary file holding text; its path goes into path (64 bytes). */
static void write_temp(char *path, size_t len, const char *text)
{
	int fd;

	snprintf(path, len, "/tmp/daybook-test-shared-XXXXXX");
	fd = mkstemp(path);
	cr_assert(fd >= 0, "mkstemp: %s", strerror(errno));
	cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
}

static void hash_hex(const char *secret, char hex[DIGEST_SHA256_HEX_LEN + 1])
{
	unsigned char d[DIGEST_SHA256_LEN];

	cr_assert(digest_sha256(secret, strlen(secret), d));
	digest_hex(d, DIGEST_SHA256_LEN, hex);
}

Test(tokens, a_valid_file_with_comments_and_blank_lines)
{
	char ha[65], hb[65], hc[65], text[1024], path[64], err[256] = "";
	struct tokens *t = NULL;
	const struct token *tok;

	hash_hex("secret-alice", ha);
	hash_hex("secret-bob", hb);
	hash_hex("secret-carol", hc);
	for (char *p = hc; *p; p++) /* upper-case hex is accepted too */
		if (*p >= 'a' && *p <= 'f')
			*p = (char)(*p - 'a' + 'A');
	snprintf(text, sizeof(text),
		 "# Daybook tokens\n"
		 "\n"
		 "alice %s write\n"
		 "   # an indented comment\n"
		 "   \t \n"
		 "bob\t%s\tread,admin\n"
		 "carol.ops:1 %s write,read,admin\r\n",
		 ha, hb, hc);
	write_temp(path, sizeof(path), text);
	cr_assert_eq(tokens_open(&t, path, err, sizeof(err)), 0, "%s", err);
	cr_assert_not_null(t);

	tok = tokens_find(t, "secret-alice", strlen("secret-alice"));
	cr_assert_not_null(tok);
	cr_assert_str_eq(tok->id, "alice");
	cr_assert_eq(tok->scopes, (unsigned)SCOPE_WRITE);
	tok = tokens_find(t, "secret-bob", strlen("secret-bob"));
	cr_assert_not_null(tok);
	cr_assert_str_eq(tok->id, "bob");
	cr_assert_eq(tok->scopes, (unsigned)(SCOPE_READ | SCOPE_ADMIN));
	tok = tokens_find(t, "secret-carol", strlen("secret-carol"));
	cr_assert_not_null(tok);
	cr_assert_str_eq(tok->id, "carol.ops:1");
	cr_assert_eq(tok->scopes, (unsigned)(SCOPE_WRITE | SCOPE_READ | SCOPE_ADMIN));

	tokens_close(&t);
	cr_assert_null(t, "tokens_close NULLs the caller's pointer");
	unlink(path);
}

Test(tokens, find_is_by_the_secret_and_its_exact_length)
{
	char ha[65], text[256], path[64], err[256] = "";
	struct tokens *t = NULL;
	const struct token *tok;

	hash_hex("secret-alice", ha);
	snprintf(text, sizeof(text), "alice %s read\n", ha);
	write_temp(path, sizeof(path), text);
	cr_assert_eq(tokens_open(&t, path, err, sizeof(err)), 0, "%s", err);

	cr_assert_null(tokens_find(t, "secret-mallory", 14));
	cr_assert_null(tokens_find(t, "secret-alic", 11), "a prefix is not the token");
	cr_assert_null(tokens_find(t, "secret-alice ", 13));
	cr_assert_null(tokens_find(t, "", 0));
	/* The hash itself is not a credential. */
	cr_assert_null(tokens_find(t, ha, strlen(ha)));
	/* Only `len` bytes count, whatever follows them. */
	tok = tokens_find(t, "secret-aliceXYZ", 12);
	cr_assert_not_null(tok);
	cr_assert_str_eq(tok->id, "alice");
	tokens_close(&t);
	unlink(path);
}

/* The memo of the last matching secret holds a fingerprint, never the secret: a dump
 * of the process's memory must not hand out a working credential. */
Test(tokens, the_memo_remembers_a_match_by_fingerprint_not_the_secret)
{
	char ha[65], hb[65], text[512], path[64], err[256] = "";
	const char *alice = "secret-alice-0123456789abcdef", *bob = "secret-bob-0123456789abcdef";
	struct tokens *t = NULL;
	struct tokens_memo m;
	const struct token *tok;

	hash_hex(alice, ha);
	hash_hex(bob, hb);
	snprintf(text, sizeof(text), "alice %s read\nbob %s write\n", ha, hb);
	write_temp(path, sizeof(path), text);
	cr_assert_eq(tokens_open(&t, path, err, sizeof(err)), 0, "%s", err);
	tokens_memo_init(&m);
	cr_assert(m.keyed, "the memo has its random keys");

	cr_assert_null(tokens_find_memo(t, &m, "secret-mallory", 14));
	cr_assert_null(m.token, "a secret that matches no token is not remembered");
	tok = tokens_find_memo(t, &m, alice, strlen(alice));
	cr_assert(tok && strcmp(tok->id, "alice") == 0);
	cr_assert_eq(m.token, tok, "a match is remembered");
	cr_assert_null(memmem(&m, sizeof(m), alice, 8), "the secret is not in the memo");
	cr_assert_null(memmem(&m, sizeof(m), alice + 8, 8), "nor any part of it");
	cr_assert_eq(tokens_find_memo(t, &m, alice, strlen(alice)), tok, "answered by the memo");
	/* The memo answers only the very secret it remembers. */
	cr_assert_null(tokens_find_memo(t, &m, alice, strlen(alice) - 1), "a prefix");
	cr_assert_null(tokens_find_memo(t, &m, "secret-alice-0123456789abcdeF", strlen(alice)));
	cr_assert_eq(m.token, tok, "a miss leaves the memo as it was");
	tok = tokens_find_memo(t, &m, bob, strlen(bob));
	cr_assert(tok && strcmp(tok->id, "bob") == 0 && m.token == tok);
	cr_assert_eq(tokens_find_memo(t, &m, alice, strlen(alice))->id[0], 'a',
		     "the other token, the long way again");
	tokens_close(&t);
	unlink(path);
}

Test(tokens, a_file_of_only_comments_holds_no_tokens)
{
	char path[64], err[256] = "";
	struct tokens *t = NULL;

	write_temp(path, sizeof(path), "# nobody yet\n\n");
	cr_assert_eq(tokens_open(&t, path, err, sizeof(err)), 0, "%s", err);
	cr_assert_null(tokens_find(t, "anything", 8));
	tokens_close(&t);
	unlink(path);
}

Test(tokens, each_malformed_line_is_refused_naming_path_and_line)
{
	char h[65], bad_hex[65], long_hex[67], long_id[66];
	const struct {
		const char *fmt, *a, *b;
	} shapes[] = {
		{ "%s", "dave", NULL },             /* one field */
		{ "dave %s", h, NULL },             /* two fields */
		{ "dave %s read extra", h, NULL },  /* four fields */
		{ "bad/id %s read", h, NULL },      /* id of the wrong shape */
		{ "%s %s read", long_id, h },       /* id too long */
		{ "dave %.63s read", h, NULL },     /* hash too short */
		{ "dave %s read", long_hex, NULL }, /* hash too long */
		{ "dave %s read", bad_hex, NULL },  /* hash not hex */
		{ "dave %s read,delete", h, NULL }, /* unknown scope */
		{ "dave %s Read", h, NULL },        /* scopes are lower-case */
		{ "dave %s ,", h, NULL },           /* no scope at all */
	};

	hash_hex("x", h);
	memcpy(bad_hex, h, sizeof(h));
	bad_hex[10] = 'g';
	snprintf(long_hex, sizeof(long_hex), "%s00", h);
	memset(long_id, 'i', 65);
	long_id[65] = '\0';
	for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
		char line[256], text[512], path[64], err[256] = "", prefix[96];
		struct tokens *t = NULL;
		int rc;

		snprintf(line, sizeof(line), shapes[i].fmt, shapes[i].a, shapes[i].b);
		snprintf(text, sizeof(text), "# tokens\nalice %s write\n%s\nbob %s read\n", h, line,
			 h);
		write_temp(path, sizeof(path), text);
		rc = tokens_open(&t, path, err, sizeof(err));
		cr_assert_lt(rc, 0, "line '%s' was accepted", line);
		cr_assert_null(t);
		snprintf(prefix, sizeof(prefix), "%s:3: ", path);
		cr_assert(strncmp(err, prefix, strlen(prefix)) == 0,
			  "for line '%s' the error '%s' should start with '%s'", line, err, prefix);
		cr_assert_gt(strlen(err), strlen(prefix), "the error says why");
		unlink(path);
	}
}

Test(tokens, a_missing_file_is_an_error_naming_it)
{
	char err[256] = "";
	struct tokens *t = NULL;
	const char *path = "/tmp/daybook-test-shared-no-such-file";

	unlink(path);
	cr_assert_eq(tokens_open(&t, path, err, sizeof(err)), -ENOENT);
	cr_assert_null(t);
	cr_assert_not_null(strstr(err, path), "error: %s", err);
}

/* --- config ------------------------------------------------------------------------ */

static void clear_config_env(void)
{
	static const char *const vars[] = { "DAYBOOK_PG",
					    "DAYBOOK_REDIS",
					    "DAYBOOK_LISTEN",
					    "DAYBOOK_TOKENS_FILE",
					    "DAYBOOK_LOG_LEVEL",
					    "DAYBOOK_REDIS_PASSWORD_FILE",
					    "DAYBOOK_MAX_CONNECTIONS",
					    "DAYBOOK_HTTP_HEADER_TIMEOUT_MS",
					    "DAYBOOK_HTTP_IDLE_TIMEOUT_MS",
					    "DAYBOOK_HTTP_LIBEVENT_READS" };

	for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++)
		unsetenv(vars[i]);
}

Test(config, parse_hostport_good_forms)
{
	char host[256];
	uint16_t port = 0;

	cr_assert(config_parse_hostport("127.0.0.1:8081", host, sizeof(host), &port));
	cr_assert_str_eq(host, "127.0.0.1");
	cr_assert_eq(port, 8081);
	cr_assert(config_parse_hostport("localhost:1", host, sizeof(host), &port));
	cr_assert_str_eq(host, "localhost");
	cr_assert_eq(port, 1);
	cr_assert(config_parse_hostport("0.0.0.0:65535", host, sizeof(host), &port));
	cr_assert_str_eq(host, "0.0.0.0");
	cr_assert_eq(port, 65535);
}

Test(config, parse_hostport_bad_forms)
{
	const char *bad[] = { "nonsense", "",        ":8080",
			      "host:",    "host:0",  "host:65536",
			      "host:80x", "host:-1", "host:99999999999999999999" };
	char host[256], small[4];
	uint16_t port;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_not(config_parse_hostport(bad[i], host, sizeof(host), &port),
			      "'%s' was accepted", bad[i]);
	cr_assert_not(config_parse_hostport("longhost:80", small, sizeof(small), &port),
		      "a host longer than the buffer is refused, not cut short");
}

Test(config, parse_redis_good_forms)
{
	struct config_redis r;

	cr_assert(config_parse_redis("redis://127.0.0.1:6379", &r));
	cr_assert_str_eq(r.host, "127.0.0.1");
	cr_assert_eq(r.port, 6379);
	cr_assert_eq(r.db, 0);
	cr_assert_str_eq(r.path, "");

	cr_assert(config_parse_redis("redis://cache.local:6380/3", &r));
	cr_assert_str_eq(r.host, "cache.local");
	cr_assert_eq(r.port, 6380);
	cr_assert_eq(r.db, 3);

	cr_assert(config_parse_redis("unix:///run/redis/redis.sock", &r));
	cr_assert_str_eq(r.path, "/run/redis/redis.sock");
	cr_assert_str_eq(r.host, "");
	cr_assert_eq(r.db, 0);

	cr_assert(config_parse_redis("unix:///tmp/r.sock?db=2", &r));
	cr_assert_str_eq(r.path, "/tmp/r.sock");
	cr_assert_eq(r.db, 2);
}

Test(config, parse_redis_bad_forms)
{
	const char *bad[] = { "",
			      "127.0.0.1:6379",
			      "http://127.0.0.1:6379",
			      "redis://",
			      "redis://host",
			      "redis://host:port",
			      "redis://host:0",
			      "redis://:6379",
			      "redis://host:6379/x",
			      "redis://host:6379/-1",
			      "unix://",
			      "unix://relative/path.sock",
			      "unix:///tmp/r.sock?db=x" };
	struct config_redis r;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_not(config_parse_redis(bad[i], &r), "'%s' was accepted", bad[i]);
}

Test(config, load_reads_every_setting)
{
	struct config cfg;
	char err[512] = "";

	clear_config_env();
	setenv("DAYBOOK_PG", "host=db dbname=daybook", 1);
	setenv("DAYBOOK_REDIS", "redis://cache:6390/1", 1);
	setenv("DAYBOOK_LISTEN", "0.0.0.0:9000", 1);
	setenv("DAYBOOK_TOKENS_FILE", "/etc/daybook/tokens", 1);
	setenv("DAYBOOK_LOG_LEVEL", "debug", 1);
	cr_assert(config_load(&cfg, CONFIG_NEED_PG | CONFIG_NEED_REDIS | CONFIG_NEED_TOKENS,
			      "127.0.0.1:8081", err, sizeof(err)),
		  "%s", err);
	cr_assert_str_eq(cfg.pg, "host=db dbname=daybook");
	cr_assert_str_eq(cfg.redis_url, "redis://cache:6390/1");
	cr_assert_str_eq(cfg.redis.host, "cache");
	cr_assert_eq(cfg.redis.port, 6390);
	cr_assert_eq(cfg.redis.db, 1);
	cr_assert_str_eq(cfg.listen_host, "0.0.0.0");
	cr_assert_eq(cfg.listen_port, 9000);
	cr_assert_str_eq(cfg.tokens_file, "/etc/daybook/tokens");
	cr_assert_eq(cfg.log_level, LOG_DEBUG);
}

Test(config, load_defaults)
{
	struct config cfg;
	char err[512] = "";

	clear_config_env();
	setenv("DAYBOOK_PG", "dbname=daybook", 1);
	cr_assert(config_load(&cfg, CONFIG_NEED_PG, "127.0.0.1:8082", err, sizeof(err)), "%s", err);
	cr_assert_str_eq(cfg.listen_host, "127.0.0.1");
	cr_assert_eq(cfg.listen_port, 8082);
	cr_assert_eq(cfg.log_level, LOG_INFO);
	cr_assert_null(cfg.redis_url);
	cr_assert_null(cfg.tokens_file);

	cr_assert(config_load(&cfg, CONFIG_NEED_PG, NULL, err, sizeof(err)), "%s", err);
	cr_assert_eq(cfg.listen_port, 0, "no listener without a default or DAYBOOK_LISTEN");
}

/* config_load must fail with one line naming `var`. */
static void assert_load_fails_naming(unsigned need, const char *var)
{
	struct config cfg;
	char err[512] = "";

	cr_assert_not(config_load(&cfg, need, "127.0.0.1:8081", err, sizeof(err)),
		      "expected a complaint about %s", var);
	cr_assert_not_null(strstr(err, var), "the error '%s' should name %s", err, var);
	cr_assert_null(strchr(err, '\n'), "one line: '%s'", err);
}

Test(config, missing_required_settings_are_named)
{
	struct config cfg;
	char err[512] = "";

	clear_config_env();
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_PG");
	setenv("DAYBOOK_PG", "", 1); /* empty is as good as unset */
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_PG");
	cr_assert(config_load(&cfg, 0, NULL, err, sizeof(err)), "not required: %s", err);
	cr_assert_null(cfg.pg);

	setenv("DAYBOOK_PG", "dbname=x", 1);
	assert_load_fails_naming(CONFIG_NEED_PG | CONFIG_NEED_REDIS, "DAYBOOK_REDIS");
	assert_load_fails_naming(CONFIG_NEED_PG | CONFIG_NEED_TOKENS, "DAYBOOK_TOKENS_FILE");
}

Test(config, malformed_settings_are_named)
{
	clear_config_env();
	setenv("DAYBOOK_PG", "dbname=x", 1);

	setenv("DAYBOOK_LISTEN", "nonsense", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_LISTEN");
	setenv("DAYBOOK_LISTEN", "127.0.0.1:70000", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_LISTEN");
	unsetenv("DAYBOOK_LISTEN");

	/* Malformed is refused even where Redis is optional. */
	setenv("DAYBOOK_REDIS", "redis://nope", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_REDIS");
	assert_load_fails_naming(CONFIG_NEED_PG | CONFIG_NEED_REDIS, "DAYBOOK_REDIS");
	unsetenv("DAYBOOK_REDIS");

	setenv("DAYBOOK_LOG_LEVEL", "loud", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_LOG_LEVEL");
	setenv("DAYBOOK_LOG_LEVEL", "INFO", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_LOG_LEVEL");
}

Test(config, parse_redis_with_user_and_password)
{
	struct config_redis r;
	char shown[600];

	cr_assert(config_parse_redis("redis://daybook-query:s3cr%40t%2F@127.0.0.1:6379/2", &r));
	cr_assert_str_eq(r.user, "daybook-query");
	cr_assert_str_eq(r.password, "s3cr@t/", "percent-decoded");
	cr_assert_str_eq(r.host, "127.0.0.1");
	cr_assert_eq(r.port, 6379);
	cr_assert_eq(r.db, 2);

	cr_assert(config_parse_redis("redis://:only-a-password@cache:6380", &r));
	cr_assert_str_eq(r.user, "");
	cr_assert_str_eq(r.password, "only-a-password");
	cr_assert_str_eq(r.host, "cache");

	cr_assert(config_parse_redis("redis://daybook-projector@cache:6380", &r));
	cr_assert_str_eq(r.user, "daybook-projector");
	cr_assert_str_eq(r.password, "");

	cr_assert(config_parse_redis("unix://daybook-admin:pw@/run/redis.sock?db=1", &r));
	cr_assert_str_eq(r.user, "daybook-admin");
	cr_assert_str_eq(r.password, "pw");
	cr_assert_str_eq(r.path, "/run/redis.sock");
	cr_assert_eq(r.db, 1);

	/* What logs show: the server and the user, never the password. */
	cr_assert(config_parse_redis("redis://daybook-query:hunter2@127.0.0.1:6379/2", &r));
	config_redis_describe(&r, shown, sizeof(shown));
	cr_assert_str_eq(shown, "127.0.0.1:6379/2 as daybook-query");
	cr_assert_null(strstr(shown, "hunter2"));

	cr_assert_not(config_parse_redis("redis://user:bad%4@127.0.0.1:6379", &r));
	cr_assert_not(config_parse_redis("redis://user:nul%00@127.0.0.1:6379", &r));
}

Test(config, parse_redis_ipv6_hosts)
{
	struct config_redis r;
	char shown[600];

	cr_assert(config_parse_redis("redis://[::1]:6379/0", &r));
	cr_assert_str_eq(r.host, "::1", "the brackets are the URL's, not the address's");
	cr_assert_eq(r.port, 6379);
	cr_assert_eq(r.db, 0);
	config_redis_describe(&r, shown, sizeof(shown));
	cr_assert_str_eq(shown, "[::1]:6379/0");

	cr_assert(config_parse_redis("redis://daybook-query:p%3Aw@[2001:db8::7]:6380/4", &r));
	cr_assert_str_eq(r.host, "2001:db8::7");
	cr_assert_str_eq(r.user, "daybook-query");
	cr_assert_str_eq(r.password, "p:w");
	cr_assert_eq(r.port, 6380);
	cr_assert_eq(r.db, 4);

	cr_assert_not(config_parse_redis("redis://[::1]/0", &r), "a port is required");
	cr_assert_not(config_parse_redis("redis://[::1:6379", &r));
	cr_assert_not(config_parse_redis("redis://::1:6379", &r), "IPv6 needs brackets");
	cr_assert_not(config_parse_redis("redis://[not-an-address]:6379", &r));
}

Test(config, parse_redis_refuses_what_redis_urls_do_not_have)
{
	const char *bad[] = { "redis://host:70000",      "redis://host:6379?db=1",
			      "redis://host:6379#frag",  "redis://host:6379/1/2",
			      "unix://host/tmp/r.sock",  "unix:///tmp/r.sock?x=1",
			      "unix://:6379/tmp/r.sock", "redis://us er@host:6379",
			      "redis://u:p@ss@host:6379" };
	struct config_redis r;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		cr_assert_not(config_parse_redis(bad[i], &r), "'%s' was accepted", bad[i]);
		cr_assert_str_eq(r.password, "", "nothing half-parsed is left");
	}
}

Test(config, cors_origins_are_checked_and_off_when_unset)
{
	const char *good[] = { "*", "https://app.example.com", "http://localhost:3000",
			       "https://a.example, https://b.example", "https://[::1]:8443 *" };
	const char *bad[] = { "",
			      " , ",
			      "app.example.com",
			      "https://",
			      "ftp://x.example",
			      "https://app.example.com/path",
			      "https://user@app.example",
			      "https://a.example?x=1",
			      "https://a\x01.example" };

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		cr_assert(config_cors_origins_valid(good[i]), "'%s' was refused", good[i]);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_not(config_cors_origins_valid(bad[i]), "'%s' was accepted", bad[i]);
}

Test(config, parse_redis_sentinel_urls_name_every_sentinel_and_the_primary)
{
	struct config_redis r;
	char shown[1400];

	cr_assert(config_parse_redis("redis-sentinel://daybook-query:pw%40x@127.0.0.1:26379,"
				     "sentinel-b:26380/daybook/2",
				     &r));
	cr_assert_str_eq(r.sentinels, "127.0.0.1:26379,sentinel-b:26380");
	cr_assert_str_eq(r.master, "daybook");
	cr_assert_eq(r.db, 2);
	cr_assert_str_eq(r.user, "daybook-query");
	cr_assert_str_eq(r.password, "pw@x");
	cr_assert_str_eq(r.host, "", "the primary is found at connection time");
	config_redis_describe(&r, shown, sizeof(shown));
	cr_assert_str_eq(shown, "primary daybook of Sentinels 127.0.0.1:26379,sentinel-b:26380/2 "
				"as daybook-query");

	cr_assert(config_parse_redis("redis-sentinel://127.0.0.1:26379/my_primary.1", &r));
	cr_assert_str_eq(r.sentinels, "127.0.0.1:26379");
	cr_assert_str_eq(r.master, "my_primary.1");
	cr_assert_eq(r.db, 0);

	cr_assert(config_parse_redis("redis://127.0.0.1:6379", &r));
	cr_assert_str_eq(r.master, "", "a fixed server has no Sentinels");
	cr_assert_str_eq(r.sentinels, "");
}

Test(config, parse_redis_sentinel_urls_refuse_malformed_ones)
{
	const char *bad[] = { "redis-sentinel://",
			      "redis-sentinel://127.0.0.1:26379",
			      "redis-sentinel://127.0.0.1:26379/",
			      "redis-sentinel:///daybook",
			      "redis-sentinel://127.0.0.1/daybook",
			      "redis-sentinel://127.0.0.1:26379,/daybook",
			      "redis-sentinel://127.0.0.1:26379,,h:1/daybook",
			      "redis-sentinel://127.0.0.1:0/daybook",
			      "redis-sentinel://127.0.0.1:26379/day book",
			      "redis-sentinel://127.0.0.1:26379/daybook/x",
			      "redis-sentinel://u:bad%4@127.0.0.1:26379/daybook" };
	struct config_redis r;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_not(config_parse_redis(bad[i], &r), "'%s' was accepted", bad[i]);
}

Test(config, redis_password_from_a_file)
{
	struct config cfg;
	char err[512] = "", path[64];

	clear_config_env();
	setenv("DAYBOOK_PG", "dbname=x", 1);
	write_temp(path, sizeof(path), "from-the-file\n");
	setenv("DAYBOOK_REDIS", "redis://daybook-query@127.0.0.1:6379", 1);
	setenv("DAYBOOK_REDIS_PASSWORD_FILE", path, 1);
	cr_assert(config_load(&cfg, CONFIG_NEED_PG | CONFIG_NEED_REDIS, NULL, err, sizeof(err)),
		  "%s", err);
	cr_assert_str_eq(cfg.redis.user, "daybook-query");
	cr_assert_str_eq(cfg.redis.password, "from-the-file");

	/* A password in both places is ambiguous. */
	setenv("DAYBOOK_REDIS", "redis://daybook-query:other@127.0.0.1:6379", 1);
	assert_load_fails_naming(CONFIG_NEED_PG | CONFIG_NEED_REDIS, "DAYBOOK_REDIS_PASSWORD_FILE");
	setenv("DAYBOOK_REDIS", "redis://daybook-query@127.0.0.1:6379", 1);
	unlink(path);
	assert_load_fails_naming(CONFIG_NEED_PG | CONFIG_NEED_REDIS, "DAYBOOK_REDIS_PASSWORD_FILE");
	write_temp(path, sizeof(path), "\n");
	assert_load_fails_naming(CONFIG_NEED_PG | CONFIG_NEED_REDIS, "DAYBOOK_REDIS_PASSWORD_FILE");
	unlink(path);
	clear_config_env();
}

Test(config, http_limits_have_defaults_and_are_read_and_checked)
{
	struct config cfg;
	char err[512] = "";

	clear_config_env();
	setenv("DAYBOOK_PG", "dbname=x", 1);
	cr_assert(config_load(&cfg, CONFIG_NEED_PG, NULL, err, sizeof(err)), "%s", err);
	cr_assert_eq(cfg.http.max_connections, 512);
	cr_assert_eq(cfg.http.header_timeout_ms, 10000);
	cr_assert_eq(cfg.http.idle_timeout_ms, 60000);
	cr_assert_not(cfg.http.libevent_reads);

	setenv("DAYBOOK_MAX_CONNECTIONS", "100", 1);
	setenv("DAYBOOK_HTTP_HEADER_TIMEOUT_MS", "1500", 1);
	setenv("DAYBOOK_HTTP_IDLE_TIMEOUT_MS", "2500", 1);
	setenv("DAYBOOK_HTTP_LIBEVENT_READS", "1", 1);
	cr_assert(config_load(&cfg, CONFIG_NEED_PG, NULL, err, sizeof(err)), "%s", err);
	cr_assert_eq(cfg.http.max_connections, 100);
	cr_assert_eq(cfg.http.header_timeout_ms, 1500);
	cr_assert_eq(cfg.http.idle_timeout_ms, 2500);
	cr_assert(cfg.http.libevent_reads);
	setenv("DAYBOOK_HTTP_LIBEVENT_READS", "0", 1);
	cr_assert(config_load(&cfg, CONFIG_NEED_PG, NULL, err, sizeof(err)), "%s", err);
	cr_assert_not(cfg.http.libevent_reads);
	setenv("DAYBOOK_HTTP_LIBEVENT_READS", "yes", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_HTTP_LIBEVENT_READS");
	setenv("DAYBOOK_HTTP_LIBEVENT_READS", "2", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_HTTP_LIBEVENT_READS");
	unsetenv("DAYBOOK_HTTP_LIBEVENT_READS");

	const char *const bad[] = { "0", "-1", "10x", "", " 5", "99999999999999999999" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (!*bad[i])
			continue; /* empty is unset */
		setenv("DAYBOOK_MAX_CONNECTIONS", bad[i], 1);
		assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_MAX_CONNECTIONS");
	}
	unsetenv("DAYBOOK_MAX_CONNECTIONS");
	setenv("DAYBOOK_HTTP_HEADER_TIMEOUT_MS", "10", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_HTTP_HEADER_TIMEOUT_MS");
	unsetenv("DAYBOOK_HTTP_HEADER_TIMEOUT_MS");
	setenv("DAYBOOK_HTTP_IDLE_TIMEOUT_MS", "soon", 1);
	assert_load_fails_naming(CONFIG_NEED_PG, "DAYBOOK_HTTP_IDLE_TIMEOUT_MS");
}

/* --- evmem ------------------------------------------------------------------------- */

Test(evmem, a_freed_block_serves_the_next_allocation_of_its_size)
{
	char *a = evmem_malloc(100), *b, *c;

	cr_assert_not_null(a);
	memset(a, 'x', 100);
	evmem_free(a);
	cr_assert_eq(evmem_kept(), 112, "kept %zu", evmem_kept());
	b = evmem_malloc(97); /* the same 16-byte class */
	cr_assert_eq(b, a);
	cr_assert_eq(evmem_kept(), 0);
	c = evmem_malloc(100); /* none kept now: a new block */
	cr_assert_neq(c, a);
	cr_assert_eq((uintptr_t)b % 16, 0);
	cr_assert_eq((uintptr_t)c % 16, 0);
	evmem_free(b);
	evmem_free(c);
	evmem_free(NULL);
	cr_assert_eq(evmem_kept(), 224);
	/* Zero bytes is a block too, and every size up to the largest class is kept. */
	b = evmem_malloc(0);
	cr_assert_not_null(b);
	evmem_free(b);
	b = evmem_malloc(EVMEM_CLASS_MAX);
	memset(b, 'y', EVMEM_CLASS_MAX);
	evmem_free(b);
	cr_assert_eq(evmem_kept(), 224 + 16 + EVMEM_CLASS_MAX);
	/* Larger blocks go back to malloc. */
	b = evmem_malloc(EVMEM_CLASS_MAX + 1);
	memset(b, 'z', EVMEM_CLASS_MAX + 1);
	evmem_free(b);
	cr_assert_eq(evmem_kept(), 224 + 16 + EVMEM_CLASS_MAX);
}

Test(evmem, realloc_keeps_the_bytes_and_grows_only_past_the_room)
{
	char *a = evmem_malloc(20), *b, *c;

	memcpy(a, "0123456789abcdefghi", 20);
	b = evmem_realloc(a, 32); /* within the block's room */
	cr_assert_eq(b, a);
	c = evmem_realloc(b, 5000);
	cr_assert_not_null(c);
	cr_assert_str_eq(c, "0123456789abcdefghi");
	memset(c + 20, 'q', 4980);
	b = evmem_realloc(c, 6000);
	cr_assert_str_eq(b, "0123456789abcdefghi");
	cr_assert_eq(b[4999], 'q');
	evmem_free(b);
	a = evmem_realloc(NULL, 10);
	cr_assert_not_null(a);
	evmem_free(a);
}

Test(evmem, a_thread_keeps_at_most_its_budget)
{
	enum { N = EVMEM_KEEP_BYTES / EVMEM_CLASS_MAX + 8 };
	void *blocks[N];

	for (int i = 0; i < N; i++)
		cr_assert_not_null(blocks[i] = evmem_malloc(EVMEM_CLASS_MAX));
	for (int i = 0; i < N; i++)
		evmem_free(blocks[i]);
	cr_assert_eq(evmem_kept(), EVMEM_KEEP_BYTES, "kept %zu", evmem_kept());
}

/* --- strmap ------------------------------------------------------------------------ */

/* A value that counts its own release. */
struct tracked {
	int *freed;
	int n;
};

static struct tracked *tracked_new(int *freed, int n)
{
	struct tracked *t = malloc(sizeof(*t));

	cr_assert_not_null(t);
	t->freed = freed;
	t->n = n;
	return t;
}

static void tracked_free(void *p)
{
	struct tracked *t = p;

	(*t->freed)++;
	free(t);
}

Test(strmap, put_get_and_a_copied_key)
{
	struct strmap *m = NULL;
	int freed = 0;
	char key[16] = "alpha";
	struct tracked *a = tracked_new(&freed, 1), *b = tracked_new(&freed, 2);

	cr_assert_eq(strmap_open(&m, tracked_free), 0);
	cr_assert_eq(strmap_count(m), 0);
	cr_assert_null(strmap_get(m, "alpha"));
	cr_assert(strmap_put(m, key, a));
	strcpy(key, "XXXXX"); /* the map keeps its own copy */
	cr_assert(strmap_put(m, "beta", b));
	cr_assert_eq(strmap_get(m, "alpha"), a);
	cr_assert_eq(strmap_get(m, "beta"), b);
	cr_assert_null(strmap_get(m, "XXXXX"));
	cr_assert_null(strmap_get(m, "alph"));
	cr_assert_null(strmap_get(m, ""));
	cr_assert_eq(strmap_count(m), 2);
	cr_assert_eq(freed, 0);
	strmap_close(&m);
	cr_assert_null(m);
	cr_assert_eq(freed, 2, "close releases every value");
}

Test(strmap, replace_frees_the_old_value)
{
	struct strmap *m = NULL;
	int freed = 0;
	struct tracked *a = tracked_new(&freed, 1), *b = tracked_new(&freed, 2);

	cr_assert_eq(strmap_open(&m, tracked_free), 0);
	cr_assert(strmap_put(m, "k", a));
	cr_assert(strmap_put(m, "k", b));
	cr_assert_eq(freed, 1);
	cr_assert_eq(strmap_get(m, "k"), b);
	cr_assert_eq(strmap_count(m), 1);
	/* Storing the same value again must not free what is still stored. */
	cr_assert(strmap_put(m, "k", b));
	cr_assert_eq(freed, 1);
	cr_assert_eq(((struct tracked *)strmap_get(m, "k"))->n, 2);
	strmap_close(&m);
	cr_assert_eq(freed, 2);
}

Test(strmap, remove_and_clear)
{
	struct strmap *m = NULL;
	int freed = 0;

	cr_assert_eq(strmap_open(&m, tracked_free), 0);
	cr_assert(strmap_put(m, "a", tracked_new(&freed, 1)));
	cr_assert(strmap_put(m, "b", tracked_new(&freed, 2)));
	cr_assert(strmap_put(m, "c", tracked_new(&freed, 3)));
	cr_assert(strmap_remove(m, "b"));
	cr_assert_eq(freed, 1);
	cr_assert_null(strmap_get(m, "b"));
	cr_assert_not(strmap_remove(m, "b"), "already gone");
	cr_assert_not(strmap_remove(m, "zzz"));
	cr_assert_eq(strmap_count(m), 2);
	cr_assert_eq(((struct tracked *)strmap_get(m, "c"))->n, 3);

	strmap_clear(m);
	cr_assert_eq(freed, 3);
	cr_assert_eq(strmap_count(m), 0);
	cr_assert_null(strmap_get(m, "a"));
	/* Still usable after a clear. */
	cr_assert(strmap_put(m, "a", tracked_new(&freed, 4)));
	cr_assert_eq(((struct tracked *)strmap_get(m, "a"))->n, 4);
	strmap_close(&m);
	cr_assert_eq(freed, 4);
}

/* A cleared or removed entry is reused by later puts: keys of every length around the
 * room an entry is made with (16-byte steps) come back whole, and a longer key than a
 * reused entry holds gets an entry of its own. */
Test(strmap, entries_reused_after_a_clear_keep_keys_of_any_length)
{
	struct strmap *m = NULL;
	char key[80];

	cr_assert_eq(strmap_open(&m, NULL), 0);
	for (int round = 0; round < 3; round++) {
		/* Short keys first in one round, long ones first in the next. */
		for (int i = 0; i < 70; i++) {
			int n = round == 1 ? 70 - i : i + 1;
			memset(key, 'a' + round, (size_t)n);
			key[n] = '\0';
			key[0] = (char)('0' + n % 10);
			cr_assert(strmap_put(m, key, (void *)(intptr_t)(n + 100 * round)));
		}
		cr_assert_eq(strmap_count(m), 70);
		for (int n = 1; n <= 70; n++) {
			memset(key, 'a' + round, (size_t)n);
			key[n] = '\0';
			key[0] = (char)('0' + n % 10);
			cr_assert_eq((intptr_t)strmap_get(m, key), n + 100 * round,
				     "lost a key of %d", n);
			key[n - 1] = 'z';
			cr_assert_null(strmap_get(m, key), "a key of %d with its last byte changed",
				       n);
		}
		if (round == 0) {
			strmap_clear(m);
		} else {
			for (int n = 1; n <= 70; n++) {
				memset(key, 'a' + round, (size_t)n);
				key[n] = '\0';
				key[0] = (char)('0' + n % 10);
				cr_assert(strmap_remove(m, key));
			}
		}
		cr_assert_eq(strmap_count(m), 0);
	}
	strmap_close(&m);
}

Test(strmap, grows_past_many_entries)
{
	enum { N = 20000 };
	struct strmap *m = NULL;
	char key[32];

	cr_assert_eq(strmap_open(&m, NULL), 0);
	for (intptr_t i = 0; i < N; i++) {
		snprintf(key, sizeof(key), "account-%ld", (long)i);
		cr_assert(strmap_put(m, key, (void *)(i + 1)));
	}
	cr_assert_eq(strmap_count(m), N);
	for (intptr_t i = 0; i < N; i++) {
		snprintf(key, sizeof(key), "account-%ld", (long)i);
		cr_assert_eq((intptr_t)strmap_get(m, key), i + 1, "lost %s", key);
	}
	for (intptr_t i = 0; i < N; i += 2) {
		snprintf(key, sizeof(key), "account-%ld", (long)i);
		cr_assert(strmap_remove(m, key));
	}
	cr_assert_eq(strmap_count(m), N / 2);
	for (intptr_t i = 0; i < N; i++) {
		snprintf(key, sizeof(key), "account-%ld", (long)i);
		if (i % 2 == 0)
			cr_assert_null(strmap_get(m, key));
		else
			cr_assert_eq((intptr_t)strmap_get(m, key), i + 1);
	}
	strmap_close(&m);
}

Test(strmap, siphash_matches_the_published_test_vectors)
{
	unsigned char msg[15];

	for (size_t i = 0; i < sizeof(msg); i++)
		msg[i] = (unsigned char)i;
	/* SipHash-2-4, key 00 01 .. 0f: the reference implementation's vectors.h. */
	cr_assert_eq(strmap_siphash(0x0706050403020100ULL, 0x0f0e0d0c0b0a0908ULL, msg, 0, 2, 4),
		     0x726fdb47dd0e0e31ULL);
	cr_assert_eq(strmap_siphash(0x0706050403020100ULL, 0x0f0e0d0c0b0a0908ULL, msg, 15, 2, 4),
		     0xa129ca6149be45e5ULL);
}

Test(strmap, the_hash_of_a_key_depends_on_the_map_s_random_seed)
{
	static const char *const keys[] = { "", "alice", "account-1", "a-much-longer-account-id" };
	struct strmap *a = NULL, *b = NULL;

	cr_assert_eq(strmap_open(&a, NULL), 0);
	cr_assert_eq(strmap_open(&b, NULL), 0);
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		/* Stable within a map, different across maps (equal with odds of 2^-64). */
		cr_assert_eq(strmap_hash(a, keys[i]), strmap_hash(a, keys[i]));
		cr_assert_neq(strmap_hash(a, keys[i]), strmap_hash(b, keys[i]),
			      "'%s' hashes alike in two maps: the hash is not seeded", keys[i]);
		cr_assert(strmap_put(a, keys[i], (void *)keys[i]));
		cr_assert(strmap_put(b, keys[i], (void *)keys[i]));
	}
	/* Behaviour is the same whatever the seed. */
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		cr_assert_eq(strmap_get(a, keys[i]), keys[i]);
		cr_assert_eq(strmap_get(b, keys[i]), keys[i]);
	}
	strmap_close(&a);
	strmap_close(&b);
}

/* --- metrics ----------------------------------------------------------------------- */

/* The rendered registry as a string; caller frees. */
static char *render(struct metrics *m)
{
	struct evbuffer *buf = evbuffer_new();
	size_t n;
	char *text;

	cr_assert_not_null(buf);
	metrics_render(m, buf);
	n = evbuffer_get_length(buf);
	text = malloc(n + 1);
	cr_assert_not_null(text);
	evbuffer_remove(buf, text, n);
	text[n] = '\0';
	evbuffer_free(buf);
	return text;
}

static size_t occurrences(const char *text, const char *needle)
{
	size_t n = 0;

	for (const char *p = text; (p = strstr(p, needle)); p += strlen(needle))
		n++;
	return n;
}

Test(metrics, counters_and_gauges_render_by_family)
{
	static const double bounds[] = { 0.1, 1, 10 };
	struct metrics *m = NULL;
	struct metric *a, *b, *up, *h;
	char *text;

	cr_assert_eq(metrics_open(&m), 0);
	a = metrics_get(m, METRIC_COUNTER, "requests_total", "Requests.", "route=\"/a\"", NULL, 0);
	up = metrics_get(m, METRIC_GAUGE, "up", "Up.", "", NULL, 0);
	/* A later series of the first family is still rendered with it. */
	b = metrics_get(m, METRIC_COUNTER, "requests_total", "Requests.", "route=\"/b\"", NULL, 0);
	h = metrics_get(m, METRIC_HISTOGRAM, "latency_seconds", "Latency.", "route=\"/a\"", bounds,
			3);
	cr_assert(a && b && up && h);
	cr_assert_eq(metrics_get(m, METRIC_COUNTER, "requests_total", "Requests.", "route=\"/a\"",
				 NULL, 0),
		     a, "the same name and labels are the same series");
	metric_add(a, 1);
	metric_add(a, 1);
	metric_add(b, 1);
	metric_set(up, 5);
	metric_add(up, -2);
	metric_observe(h, 0.05);
	metric_observe(h, 0.1); /* le is inclusive */
	metric_observe(h, 0.5);
	metric_observe(h, 20);
	text = render(m);
	cr_assert_str_eq(text, "# HELP requests_total Requests.\n"
			       "# TYPE requests_total counter\n"
			       "requests_total{route=\"/a\"} 2\n"
			       "requests_total{route=\"/b\"} 1\n"
			       "# HELP up Up.\n"
			       "# TYPE up gauge\n"
			       "up 3\n"
			       "# HELP latency_seconds Latency.\n"
			       "# TYPE latency_seconds histogram\n"
			       "latency_seconds_bucket{route=\"/a\",le=\"0.1\"} 2\n"
			       "latency_seconds_bucket{route=\"/a\",le=\"1\"} 3\n"
			       "latency_seconds_bucket{route=\"/a\",le=\"10\"} 3\n"
			       "latency_seconds_bucket{route=\"/a\",le=\"+Inf\"} 4\n"
			       "latency_seconds_sum{route=\"/a\"} 20.65\n"
			       "latency_seconds_count{route=\"/a\"} 4\n");
	free(text);
	metrics_close(&m);
	cr_assert_null(m);
}

struct lookup_worker {
	struct metrics *m;
	struct metric *got[64];
};

static void *look_up_all(void *arg)
{
	struct lookup_worker *w = arg;
	char labels[64];

	for (int round = 0; round < 50; round++) {
		for (int i = 0; i < 64; i++) {
			snprintf(labels, sizeof(labels), "route=\"/r%d\"", i);
			w->got[i] = metrics_get(w->m, METRIC_COUNTER, "hits_total", "Hits.", labels,
						NULL, 0);
			metric_add(w->got[i], 1);
		}
	}
	return NULL;
}

Test(metrics, lookups_from_many_threads_share_one_series_per_labels)
{
	struct metrics *m;
	struct lookup_worker w[4];
	pthread_t tid[4];
	char *text, line[128];

	cr_assert_eq(metrics_open(&m), 0);
	for (int t = 0; t < 4; t++) {
		w[t].m = m;
		cr_assert_eq(pthread_create(&tid[t], NULL, look_up_all, &w[t]), 0);
	}
	for (int t = 0; t < 4; t++)
		pthread_join(tid[t], NULL);
	for (int i = 0; i < 64; i++)
		for (int t = 1; t < 4; t++)
			cr_assert_eq(w[t].got[i], w[0].got[i], "one series for route /r%d", i);
	text = render(m);
	cr_assert_eq(occurrences(text, "# TYPE hits_total counter\n"), 1);
	for (int i = 0; i < 64; i++) {
		snprintf(line, sizeof(line), "hits_total{route=\"/r%d\"} 200\n", i);
		cr_assert_eq(occurrences(text, line), 1, "%s in:\n%s", line, text);
	}
	free(text);
	metrics_close(&m);
}

/* The value on the line of `series` (name plus labels as rendered, or a bare name that
 * may be followed by "{}"); fails when the line is absent. */
static double series_value(const char *text, const char *series)
{
	size_t n = strlen(series);
	const char *line = text;

	while (line && *line) {
		if (strncmp(line, series, n) == 0 && line[n] == ' ')
			return strtod(line + n + 1, NULL);
		if (strncmp(line, series, n) == 0 && strncmp(line + n, "{} ", 3) == 0)
			return strtod(line + n + 3, NULL);
		line = strchr(line, '\n');
		if (line)
			line++;
	}
	cr_assert_fail("no series %s in:\n%s", series, text);
	return 0;
}

Test(metrics, histograms_are_cumulative_with_inf_sum_and_count)
{
	struct metrics *m = NULL;
	struct metric *h, *h2;
	char *text;

	cr_assert_eq(metrics_open(&m), 0);
	h = metrics_get(m, METRIC_HISTOGRAM, "batch_size", "Events per append.", "",
			metrics_size_buckets, metrics_size_buckets_len);
	h2 = metrics_get(m, METRIC_HISTOGRAM, "batch_size", "Events per append.", "kind=\"x\"",
			 metrics_size_buckets, metrics_size_buckets_len);
	cr_assert(h && h2);
	metric_observe(h, 1);
	metric_observe(h, 3);
	metric_observe(h, 3);
	metric_observe(h, 100);
	metric_observe(h, 5000);
	metric_observe(h2, 2);
	text = render(m);
	cr_assert_eq(occurrences(text, "# HELP batch_size "), 1, "%s", text);
	cr_assert_eq(occurrences(text, "# TYPE batch_size histogram\n"), 1, "%s", text);
	cr_assert_eq(series_value(text, "batch_size_bucket{le=\"1\"}"), 1);
	cr_assert_eq(series_value(text, "batch_size_bucket{le=\"2\"}"), 1);
	cr_assert_eq(series_value(text, "batch_size_bucket{le=\"4\"}"), 3);
	cr_assert_eq(series_value(text, "batch_size_bucket{le=\"64\"}"), 3);
	cr_assert_eq(series_value(text, "batch_size_bucket{le=\"128\"}"), 4);
	cr_assert_eq(series_value(text, "batch_size_bucket{le=\"1024\"}"), 4);
	cr_assert_eq(series_value(text, "batch_size_bucket{le=\"+Inf\"}"), 5);
	cr_assert_eq(series_value(text, "batch_size_sum"), 5107);
	cr_assert_eq(series_value(text, "batch_size_count"), 5);
	cr_assert_eq(series_value(text, "batch_size_bucket{kind=\"x\",le=\"1\"}"), 0);
	cr_assert_eq(series_value(text, "batch_size_bucket{kind=\"x\",le=\"2\"}"), 1);
	cr_assert_eq(series_value(text, "batch_size_bucket{kind=\"x\",le=\"+Inf\"}"), 1);
	cr_assert_eq(series_value(text, "batch_size_count{kind=\"x\"}"), 1);
	cr_assert_eq(occurrences(text, "le=\"+Inf\""), 2);
	free(text);
	metrics_close(&m);
}

Test(metrics, labels_are_copied_and_null_series_are_ignored)
{
	struct metrics *m = NULL;
	char labels[32] = "status=\"200\"";
	struct metric *s;
	char *text;

	cr_assert_eq(metrics_open(&m), 0);
	s = metrics_get(m, METRIC_COUNTER, "hits_total", "Hits.", labels, NULL, 0);
	strcpy(labels, "status=\"999\"");
	metric_add(s, 7);
	/* What out of memory hands back must be harmless to use. */
	metric_add(NULL, 1);
	metric_set(NULL, 1);
	metric_observe(NULL, 1);
	text = render(m);
	cr_assert_eq(series_value(text, "hits_total{status=\"200\"}"), 7, "%s", text);
	cr_assert_null(strstr(text, "999"));
	free(text);
	metrics_close(&m);
}

Test(metrics, bucket_tables_are_ascending_as_documented)
{
	cr_assert_eq(metrics_latency_buckets[0], 0.00005);
	cr_assert_eq(metrics_latency_buckets[metrics_latency_buckets_len - 1], 5);
	for (size_t i = 1; i < metrics_latency_buckets_len; i++)
		cr_assert_gt(metrics_latency_buckets[i], metrics_latency_buckets[i - 1]);
	cr_assert_eq(metrics_size_buckets[0], 1);
	cr_assert_eq(metrics_size_buckets[metrics_size_buckets_len - 1], 1024);
	for (size_t i = 1; i < metrics_size_buckets_len; i++)
		cr_assert_eq(metrics_size_buckets[i], 2 * metrics_size_buckets[i - 1]);
}

/* The value of the unlabelled sample `name` in `text`; -1 when absent. */
static double sample(const char *text, const char *name)
{
	size_t n = strlen(name);

	for (const char *p = text; (p = strstr(p, name)); p += n)
		if ((p == text || p[-1] == '\n') && p[n] == ' ')
			return strtod(p + n + 1, NULL);
	return -1;
}

Test(metrics, process_metrics_and_build_info_are_read_at_scrape_time)
{
	struct evbuffer *buf = evbuffer_new();
	size_t n;
	char *text;
	int fds[2];
	double before, after, start;

	cr_assert_not_null(buf);
	metrics_render_process(buf);
	n = evbuffer_get_length(buf);
	text = calloc(1, n + 1);
	cr_assert_not_null(text);
	evbuffer_remove(buf, text, n);
	cr_assert(strstr(text, "# TYPE daybook_build_info gauge\n"));
	cr_assert(strstr(text, "daybook_build_info{version=\""), "%s", text);
	cr_assert(strstr(text, "\",commit=\""), "%s", text);
	cr_assert(strstr(text, "# TYPE process_cpu_seconds_total counter\n"), "%s", text);
	cr_assert_geq(sample(text, "process_cpu_seconds_total"), 0);
	cr_assert_gt(sample(text, "process_resident_memory_bytes"), 1024 * 1024, "%s", text);
	cr_assert_gt(sample(text, "process_virtual_memory_bytes"), 0);
	start = sample(text, "process_start_time_seconds");
	cr_assert(start > (double)time(NULL) - 3600 && start <= (double)time(NULL) + 1,
		  "start time %f", start);
	before = sample(text, "process_open_fds");
	cr_assert_geq(before, 3);
	free(text);

	/* Two more descriptors show at the next scrape. */
	cr_assert_eq(pipe(fds), 0);
	metrics_render_process(buf);
	n = evbuffer_get_length(buf);
	text = calloc(1, n + 1);
	cr_assert_not_null(text);
	evbuffer_remove(buf, text, n);
	after = sample(text, "process_open_fds");
	cr_assert_eq(after, before + 2, "open fds %f then %f", before, after);
	close(fds[0]);
	close(fds[1]);
	free(text);
	evbuffer_free(buf);
}

/* --- log --------------------------------------------------------------------------- */

Test(log, level_parse)
{
	static const struct {
		const char *text;
		enum log_level level;
	} good[] = { { "debug", LOG_DEBUG },
		     { "info", LOG_INFO },
		     { "warn", LOG_WARN },
		     { "error", LOG_ERROR } };
	const char *bad[] = { "",      "loud",    "INFO", "Info",  "info ",
			      " info", "warning", "err",  "debug2" };
	enum log_level level;

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		level = LOG_ERROR + 1;
		cr_assert(log_level_parse(good[i].text, &level), "%s", good[i].text);
		cr_assert_eq(level, good[i].level, "%s", good[i].text);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		level = LOG_WARN;
		cr_assert_not(log_level_parse(bad[i], &level), "'%s' was accepted", bad[i]);
		cr_assert_eq(level, LOG_WARN, "a refusal leaves the output alone");
	}
}

/* Everything log_msg writes to stderr while running fn; caller frees. */
static char *capture_stderr(void (*fn)(void))
{
	FILE *tmp = tmpfile();
	int saved;
	long n;
	char *text;

	cr_assert_not_null(tmp);
	fflush(stderr);
	saved = dup(2);
	cr_assert(saved >= 0);
	cr_assert(dup2(fileno(tmp), 2) >= 0);
	fn();
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	n = lseek(fileno(tmp), 0, SEEK_END);
	cr_assert(n >= 0);
	text = calloc(1, (size_t)n + 1);
	cr_assert_not_null(text);
	cr_assert_eq(pread(fileno(tmp), text, (size_t)n, 0), (ssize_t)n);
	fclose(tmp);
	return text;
}

static void log_some_lines(void)
{
	const struct log lg = { .service = "command", .level = LOG_INFO };

	log_debug(&lg, "hidden below the level");
	log_msg(&lg, LOG_WARN, "req-\"7\"", "quote \" backslash \\ newline \n tab \t end %d", 42);
	log_error(&lg, "second");
}

/* A line's "time": "2024-01-02T03:04:05.678Z", within a few seconds of now. */
static void assert_line_time_now(const char *t)
{
	struct tm tm = { 0 };
	const char *rest;

	cr_assert_not_null(t);
	cr_assert_eq(strlen(t), strlen("2024-01-02T03:04:05.678Z"), "time: %s", t);
	rest = strptime(t, "%Y-%m-%dT%H:%M:%S", &tm);
	cr_assert(rest && rest[0] == '.' && rest[4] == 'Z', "time: %s", t);
	for (int i = 1; i <= 3; i++)
		cr_assert(rest[i] >= '0' && rest[i] <= '9', "time: %s", t);
	cr_assert_lt(labs((long)(timegm(&tm) - time(NULL))), 5, "time: %s is not now", t);
}

Test(log, lines_are_json_with_escaping_and_level_filtering)
{
	char *text = capture_stderr(log_some_lines);
	char *nl = strchr(text, '\n');
	json_error_t error;
	json_t *first, *second;

	cr_assert_not_null(nl, "no line in: %s", text);
	cr_assert_eq(occurrences(text, "\n"), 2, "two lines, the debug one filtered: %s", text);
	first = json_loadb(text, (size_t)(nl - text), 0, &error);
	cr_assert_not_null(first, "not JSON: %s (%s)", text, error.text);
	cr_assert_str_eq(json_string_value(json_object_get(first, "level")), "warn");
	cr_assert_str_eq(json_string_value(json_object_get(first, "service")), "command");
	cr_assert_str_eq(json_string_value(json_object_get(first, "msg")),
			 "quote \" backslash \\ newline tab \t end 42", "one line: %s", text);
	cr_assert_str_eq(json_string_value(json_object_get(first, "request_id")), "req-\"7\"");
	assert_line_time_now(json_string_value(json_object_get(first, "time")));
	second = json_loads(nl + 1, 0, &error);
	cr_assert_not_null(second, "not JSON: %s (%s)", nl + 1, error.text);
	assert_line_time_now(json_string_value(json_object_get(second, "time")));
	cr_assert_str_eq(json_string_value(json_object_get(second, "msg")), "second");
	cr_assert_null(json_object_get(second, "request_id"));
	json_decref(first);
	json_decref(second);
	free(text);
}

static void log_hostile_lines(void)
{
	const struct log lg = { .service = "query", .level = LOG_INFO };
	json_t *fields = json_object();

	json_object_set_new(fields, "path", log_textn("/a\x01\"b\\\xff\xc3(\0z\x7f", 12));
	json_object_set_new(fields, "n", json_integer(7));
	log_fields(&lg, LOG_INFO, "id\xfe\n", "bad \xe2\x82 utf-8", fields);
	/* libpq's errors end in a newline and may add DETAIL or HINT lines. */
	log_warn(&lg, "postgresql: %s",
		 "ERROR:  relation \"x\" does not exist\nLINE 1: SELECT\n"
		 "        ^\n");
}

static void log_plain_lines(void)
{
	const struct log lg = { .service = "daybook-admin verify",
				.level = LOG_INFO,
				.plain = true };

	log_debug(&lg, "hidden below the level");
	log_error(&lg, "cannot connect: %s", "libpq says\nsomething on two lines\n");
	log_warn(&lg, "redis generation %d is behind", 7);
}

Test(log, a_plain_log_writes_one_text_line_per_message_named_by_its_service)
{
	char *text = capture_stderr(log_plain_lines);

	cr_assert_str_eq(text,
			 "daybook-admin verify: cannot connect: libpq says something on two lines\n"
			 "daybook-admin verify: note: redis generation 7 is behind\n");
	free(text);
}

Test(log, every_line_is_json_whatever_the_bytes_and_errors_are_one_line)
{
	char *text = capture_stderr(log_hostile_lines), *nl = strchr(text, '\n');
	json_error_t error;
	json_t *first, *second;

	cr_assert_eq(occurrences(text, "\n"), 2, "%s", text);
	first = json_loadb(text, (size_t)(nl - text), 0, &error);
	cr_assert_not_null(first, "not JSON: %s (%s)", text, error.text);
	cr_assert_str_eq(json_string_value(json_object_get(first, "path")),
			 "/a\x01\"b\\\xef\xbf\xbd\xef\xbf\xbd(\xef\xbf\xbdz\x7f");
	cr_assert_eq(json_integer_value(json_object_get(first, "n")), 7);
	cr_assert_str_eq(json_string_value(json_object_get(first, "msg")),
			 "bad \xef\xbf\xbd\xef\xbf\xbd utf-8");
	cr_assert_str_eq(json_string_value(json_object_get(first, "request_id")), "id\xef\xbf\xbd");
	second = json_loads(nl + 1, 0, &error);
	cr_assert_not_null(second, "not JSON: %s (%s)", nl + 1, error.text);
	cr_assert_str_eq(json_string_value(json_object_get(second, "msg")),
			 "postgresql: ERROR:  relation \"x\" does not exist LINE 1: SELECT ^");
	json_decref(first);
	json_decref(second);
	free(text);
}

static void log_built_lines(void)
{
	static struct log_buf buf; /* 4 KiB: off the stack */
	const struct log lg = { .service = "command", .level = LOG_INFO };
	const char *hostile = "/a\x01\"b\\\xff\xc3(z\x7f\x1f x \t\r\n\t y\\u0041";
	struct log_line ln;

	buf.len = 0;
	cr_assert(log_line_begin(&ln, &lg, &buf, LOG_INFO, "id\xfe\"", "request\n", 200));
	log_line_key(&ln, "path");
	log_line_text(&ln, hostile);
	log_line_key(&ln, "n");
	log_line_int(&ln, -9223372036854775807LL - 1);
	log_line_key(&ln, "a_ms");
	log_line_millis(&ln, 0.00184);
	log_line_key(&ln, "b_ms");
	log_line_millis(&ln, 2.0);
	log_line_key(&ln, "none");
	log_line_text(&ln, NULL);
	log_line_end(&ln);
	/* Left in the buffer: nothing written yet. */
	cr_assert_gt(buf.len, 0);
	fflush(stderr);
	cr_assert_eq(lseek(2, 0, SEEK_END), 0, "written before the flush");
	cr_assert(log_line_begin(&ln, &lg, &buf, LOG_WARN, NULL, "second", 0));
	log_line_end(&ln);
	log_buf_flush(&buf);
	cr_assert_eq(buf.len, 0);
}

Test(log, a_hand_built_line_escapes_as_jansson_and_waits_for_its_flush)
{
	char *text = capture_stderr(log_built_lines), *nl = strchr(text, '\n');
	const char *hostile = "/a\x01\"b\\\xff\xc3(z\x7f\x1f x \t\r\n\t y\\u0041";
	json_t *first, *second, *want = log_text(hostile);
	json_error_t error;

	cr_assert_eq(occurrences(text, "\n"), 2, "%s", text);
	first = json_loadb(text, (size_t)(nl - text), 0, &error);
	cr_assert_not_null(first, "not JSON: %s (%s)", text, error.text);
	cr_assert(json_equal(json_object_get(first, "path"), want), "%s", text);
	cr_assert_str_eq(json_string_value(json_object_get(first, "path")),
			 "/a\x01\"b\\\xef\xbf\xbd\xef\xbf\xbd(z\x7f\x1f x y\\u0041");
	cr_assert_str_eq(json_string_value(json_object_get(first, "request_id")),
			 "id\xef\xbf\xbd\"");
	cr_assert_str_eq(json_string_value(json_object_get(first, "msg")), "request");
	cr_assert_str_eq(json_string_value(json_object_get(first, "level")), "info");
	cr_assert_eq(json_integer_value(json_object_get(first, "n")), INT64_MIN);
	cr_assert(json_is_real(json_object_get(first, "a_ms")), "%s", text);
	cr_assert_float_eq(json_real_value(json_object_get(first, "a_ms")), 1.84, 1e-9);
	cr_assert(json_is_real(json_object_get(first, "b_ms")), "%s", text);
	cr_assert_float_eq(json_real_value(json_object_get(first, "b_ms")), 2000.0, 1e-9);
	cr_assert(json_is_null(json_object_get(first, "none")), "%s", text);
	assert_line_time_now(json_string_value(json_object_get(first, "time")));
	second = json_loads(nl + 1, 0, &error);
	cr_assert_not_null(second, "not JSON: %s (%s)", nl + 1, error.text);
	/* The second line's time comes from the seconds the buffer kept. */
	assert_line_time_now(json_string_value(json_object_get(second, "time")));
	cr_assert_str_eq(json_string_value(json_object_get(second, "level")), "warn");
	cr_assert_null(json_object_get(second, "request_id"));
	json_decref(want);
	json_decref(first);
	json_decref(second);
	free(text);
}

Test(log, a_text_cut_at_n_bytes_never_splits_a_character)
{
	/* "a", e-acute (2 bytes), euro sign (3), U+1F600 (4) */
	const char *text = "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
	static const size_t want[] = { 0, 1, 1, 3, 3, 3, 6, 6, 6, 6, 10 };

	for (size_t n = 0; n <= 10; n++)
		cr_assert_eq(log_text_cut(text, n), want[n], "cut at %zu: %zu", n,
			     log_text_cut(text, n));
	/* Bytes that are not UTF-8 are no character to keep whole: cut where asked. */
	cr_assert_eq(log_text_cut("a\xff\xfe", 2), 2);
	cr_assert_eq(log_text_cut("a\x80\x80\x80\x80", 4), 4);
	cr_assert_eq(log_text_cut("\xc0\x80", 1), 1);
}

/* --- pg text[] literals -------------------------------------------------------------- */

Test(pg, array_literal_quotes_and_escapes)
{
	const char *values[] = { "plain", "with \"quote\"", "back\\slash", "",
				 "a,b",   "{brace}",        "NULL",        "sp ace",
				 NULL,    "\"\\\"",         "end\\" };
	struct evbuffer *buf = evbuffer_new();
	size_t n;
	char text[256];

	cr_assert_not_null(buf);
	evbuffer_add(buf, "{", 1);
	for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++)
		pg_array_append(buf, values[i], i == 0);
	evbuffer_add(buf, "}", 1);
	n = evbuffer_get_length(buf);
	cr_assert_lt(n, sizeof(text));
	evbuffer_remove(buf, text, n);
	text[n] = '\0';
	cr_assert_str_eq(text,
			 "{\"plain\",\"with \\\"quote\\\"\",\"back\\\\slash\",\"\",\"a,b\","
			 "\"{brace}\",\"NULL\",\"sp ace\",NULL,\"\\\"\\\\\\\"\",\"end\\\\\"}");
	evbuffer_free(buf);
}

/* array_recv's layout: ndim, has-null flag, element type, then per dimension its length
 * and lower bound, then each element's length (-1: NULL) and bytes, all big-endian. */
Test(pg, binary_arrays_have_array_recvs_layout)
{
	static const unsigned char ints[] = {
		0, 0, 0, 1, 0, 0, 0,    0,    0,    0,    0,    20,   0,    0,    0,
		2, 0, 0, 0, 1, 0, 0,    0,    8,    0,    0,    0,    0,    0,    0,
		0, 1, 0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
	};
	static const unsigned char texts[] = {
		0, 0, 0, 1, 0, 0, 0, 1,   0,   0,    0,    25,   0,    0, 0, 3, 0,
		0, 0, 1, 0, 0, 0, 2, 'a', '"', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
	};
	static const unsigned char empty[] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0xa0 };
	struct pg_bin_array a;
	char *out;
	int len;

	a = (struct pg_bin_array){ .type = PG_TYPE_INT8 };
	pg_bin_int8(&a, 1);
	pg_bin_int8(&a, -2);
	cr_assert_not_null(out = pg_bin_array_take(&a, &len));
	cr_assert_eq(len, (int)sizeof(ints));
	cr_assert_arr_eq(out, ints, sizeof(ints));
	free(out);
	pg_bin_array_free(&a);

	a = (struct pg_bin_array){ .type = PG_TYPE_TEXT };
	pg_bin_text(&a, "a\"");
	pg_bin_text(&a, NULL);
	pg_bin_text(&a, "");
	cr_assert_not_null(out = pg_bin_array_take(&a, &len));
	cr_assert_eq(len, (int)sizeof(texts));
	cr_assert_arr_eq(out, texts, sizeof(texts));
	free(out);
	pg_bin_array_free(&a);

	a = (struct pg_bin_array){ .type = PG_TYPE_TIMESTAMPTZ };
	cr_assert_not_null(out = pg_bin_array_take(&a, &len));
	cr_assert_eq(len, (int)sizeof(empty));
	cr_assert_arr_eq(out, empty, sizeof(empty));
	free(out);
	pg_bin_array_free(&a);
	cr_assert_eq(pg_bin_uint("\x01\x02\x03\x04\x05\x06\x07\x08", 8), 0x0102030405060708ULL);
}

Test(pg, sqlstate_of_no_result_is_empty)
{
	cr_assert_str_eq(pg_sqlstate(NULL), "");
}

/* --- pg host lists ------------------------------------------------------------------ */

/* The value of `key` in NULL-terminated keyword/value arrays (the last one: libpq keeps
 * the last), or NULL. */
static const char *param(const char *const *keys, const char *const *values, const char *key)
{
	const char *found = NULL;

	for (size_t i = 0; keys[i]; i++)
		if (strcmp(keys[i], key) == 0)
			found = values[i];
	return found;
}

static const char *const defaults[] = { "application_name", "keepalives", NULL };
static const char *const defaults_values[] = { "test", "1", NULL };

/* An attempt that starts at host `first` lists the hosts and ports so. */
static void assert_rotated(struct pg_hosts *h, size_t first, const char *hosts, const char *ports)
{
	const char *const *k, *const *v;

	cr_assert(pg_hosts_params(h, first, defaults, defaults_values, &k, &v));
	cr_assert_str_eq(param(k, v, "host"), hosts, "from %zu", first);
	cr_assert_str_eq(param(k, v, "port"), ports, "from %zu", first);
}

Test(pg_hosts, hosts_and_ports_rotate_alike_and_every_other_setting_stays)
{
	struct pg_hosts *h = pg_hosts_parse(
		"host=a,b,c port=1,2,3 dbname=db user=u "
		"target_session_attrs=read-write application_name=mine");
	const char *const *k, *const *v;

	cr_assert_not_null(h);
	cr_assert_eq(pg_hosts_count(h), 3);
	assert_rotated(h, 0, "a,b,c", "1,2,3");
	assert_rotated(h, 1, "b,c,a", "2,3,1");
	assert_rotated(h, 2, "c,a,b", "3,1,2");
	cr_assert(pg_hosts_params(h, 2, defaults, defaults_values, &k, &v));
	cr_assert_str_eq(param(k, v, "dbname"), "db");
	cr_assert_str_eq(param(k, v, "user"), "u");
	cr_assert_str_eq(param(k, v, "target_session_attrs"), "read-write");
	/* The string's own settings come after the defaults, so they win. */
	cr_assert_str_eq(param(k, v, "application_name"), "mine");
	cr_assert_str_eq(param(k, v, "keepalives"), "1");
	cr_assert_null(param(k, v, "hostaddr"));
	pg_hosts_free(&h);
	cr_assert_null(h);
}

Test(pg_hosts, uris_with_one_port_each_or_one_for_all_and_hostaddrs)
{
	struct pg_hosts *h = pg_hosts_parse(
		"postgresql://u:p%40ss@10.0.0.1:5433,[::1]:5434/db?target_session_attrs=read-write"
		"&connect_timeout=3");
	const char *const *k, *const *v;

	cr_assert_not_null(h);
	cr_assert_eq(pg_hosts_count(h), 2);
	assert_rotated(h, 1, "::1,10.0.0.1", "5434,5433");
	cr_assert(pg_hosts_params(h, 1, defaults, defaults_values, &k, &v));
	cr_assert_str_eq(param(k, v, "password"), "p@ss");
	cr_assert_str_eq(param(k, v, "dbname"), "db");
	cr_assert_str_eq(param(k, v, "connect_timeout"), "3");
	cr_assert_float_eq(pg_hosts_timeout(h, 9), 3, 1e-9);
	pg_hosts_free(&h);

	h = pg_hosts_parse("host=a,b hostaddr=10.0.0.1,10.0.0.2 port=6000");
	cr_assert_not_null(h);
	cr_assert(pg_hosts_params(h, 1, defaults, defaults_values, &k, &v));
	cr_assert_str_eq(param(k, v, "host"), "b,a");
	cr_assert_str_eq(param(k, v, "hostaddr"), "10.0.0.2,10.0.0.1");
	cr_assert_str_eq(param(k, v, "port"), "6000");
	cr_assert_float_eq(pg_hosts_timeout(h, 9), 9, 1e-9);
	pg_hosts_free(&h);

	h = pg_hosts_parse("hostaddr=10.0.0.1,,10.0.0.3 dbname=x");
	cr_assert_not_null(h);
	cr_assert_eq(pg_hosts_count(h), 3);
	cr_assert(pg_hosts_params(h, 2, defaults, defaults_values, &k, &v));
	cr_assert_str_eq(param(k, v, "hostaddr"), "10.0.0.3,10.0.0.1,");
	pg_hosts_free(&h);
}

Test(pg_hosts, one_host_or_a_string_libpq_would_refuse_is_left_to_libpq)
{
	const char *const alone[] = {
		"host=a port=1 dbname=x",
		"postgresql://u@a:1/db",
		"dbname=x",
		"daybook",                          /* a plain database name */
		"host=a,b port=1,2,3",              /* libpq: more ports than hosts */
		"host=a,b hostaddr=10.0.0.1",       /* libpq: fewer hostaddrs than hosts */
		"host=a,b port=1 dbname='unclosed", /* does not parse */
	};

	for (size_t i = 0; i < sizeof(alone) / sizeof(alone[0]); i++)
		cr_assert_null(pg_hosts_parse(alone[i]), "%s", alone[i]);
}

Test(pg_hosts, the_host_timeout_is_connect_timeout_as_libpq_reads_it)
{
	const struct {
		const char *conninfo;
		double timeout;
	} cases[] = {
		{ "host=a,b connect_timeout=7", 7 },
		{ "host=a,b connect_timeout=1", 2 },
		{ "host=a,b connect_timeout=0", 2.5 },
		{ "host=a,b connect_timeout=-3", 2.5 },
		{ "host=a,b connect_timeout=x", 2.5 },
		{ "host=a,b connect_timeout='4 '", 4 },
		{ "host=a,b", 2.5 },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct pg_hosts *h = pg_hosts_parse(cases[i].conninfo);
		cr_assert_not_null(h, "%s", cases[i].conninfo);
		cr_assert_float_eq(pg_hosts_timeout(h, 2.5), cases[i].timeout, 1e-9, "%s",
				   cases[i].conninfo);
		pg_hosts_free(&h);
	}
}

Test(pg_hosts, find_names_the_position_of_the_host_libpq_is_on)
{
	struct pg_hosts *h = pg_hosts_parse("host=a,b,a,,c port=1,2,3,4,5");

	cr_assert_not_null(h);
	cr_assert_eq(pg_hosts_find(h, 0, 0, "a", "1"), 0);
	cr_assert_eq(pg_hosts_find(h, 0, 0, "b", "2"), 1);
	cr_assert_eq(pg_hosts_find(h, 0, 0, "a", "3"), 2);
	/* An empty host is libpq's default (a socket directory): any name matches it. */
	cr_assert_eq(pg_hosts_find(h, 0, 0, "/run/postgresql", "4"), 3);
	cr_assert_eq(pg_hosts_find(h, 0, 0, "c", "5"), 4);
	cr_assert_eq(pg_hosts_find(h, 0, 0, "c", "6"), 5, "no such host");
	/* Positions count in the rotated order, from `from` on. */
	cr_assert_eq(pg_hosts_find(h, 1, 0, "b", "2"), 0);
	cr_assert_eq(pg_hosts_find(h, 1, 0, "a", "1"), 4);
	cr_assert_eq(pg_hosts_find(h, 4, 0, "a", "1"), 1);
	cr_assert_eq(pg_hosts_find(h, 4, 2, "a", "1"), 5, "already behind");
	pg_hosts_free(&h);

	h = pg_hosts_parse("host=a,a port=7");
	cr_assert_not_null(h);
	cr_assert_eq(pg_hosts_find(h, 0, 0, "a", "7"), 0);
	cr_assert_eq(pg_hosts_find(h, 0, 1, "a", "7"), 1, "the same host listed twice");
	cr_assert_eq(pg_hosts_find(h, 0, 0, "a", "8"), 2);
	pg_hosts_free(&h);

	/* No port in the string: libpq's default, whatever it is, matches. */
	h = pg_hosts_parse("hostaddr=10.0.0.1,10.0.0.2");
	cr_assert_not_null(h);
	cr_assert_eq(pg_hosts_find(h, 0, 0, "10.0.0.2", "5432"), 1);
	pg_hosts_free(&h);
}

/* --- readmodel time text ----------------------------------------------------------- */

static void assert_time(int64_t pg_micros, const char *expected)
{
	char out[READMODEL_TIME_LEN];

	readmodel_time_text(pg_micros, out);
	cr_assert_str_eq(out, expected, "time text of %lld", (long long)pg_micros);
}

Test(readmodel, time_text_of_known_instants)
{
	const int64_t s = 1000000, day = 86400 * s;

	assert_time(0, "2000-01-01T00:00:00.000000Z");
	assert_time(1, "2000-01-01T00:00:00.000001Z");
	assert_time(-1, "1999-12-31T23:59:59.999999Z");
	assert_time(59 * day, "2000-02-29T00:00:00.000000Z");
	assert_time(60 * day - 1, "2000-02-29T23:59:59.999999Z");
	/* 2026-11-26T15:32:21.123456Z: 9826 days after 2000-01-01 */
	assert_time(9826 * day + (15 * 3600 + 32 * 60 + 21) * s + 123456,
		    "2026-11-26T15:32:21.123456Z");
	assert_time(-10957 * day, "1970-01-01T00:00:00.000000Z");
}

/* Against the C library's calendar, one instant every 7.3 days or so for 120 years. */
Test(readmodel, time_text_agrees_with_gmtime)
{
	const int64_t unix_offset = 946684800; /* 2000-01-01 in Unix seconds */

	for (int64_t t = -30LL * 365 * 86400; t < 90LL * 365 * 86400; t += 631151) {
		time_t unix_s = (time_t)(t + unix_offset);
		struct tm tm;
		char expected[40], text[48];

		cr_assert_not_null(gmtime_r(&unix_s, &tm));
		strftime(expected, sizeof(expected), "%Y-%m-%dT%H:%M:%S", &tm);
		snprintf(text, sizeof(text), "%s.%06dZ", expected, (int)(t % 1000 + 1000) % 1000);
		assert_time(t * 1000000 + (t % 1000 + 1000) % 1000, text);
	}
}

/* --- readmodel JSON bodies ----------------------------------------------------------- */

/* What the bodies must equal: jansson's compact dump of the same object. */
static char *jansson_entry(const struct readmodel_entry *e)
{
	json_t *o = json_pack("{s:I, s:s, s:I, s:I}", "version", (json_int_t)e->version, "type",
			      e->type, "amount", (json_int_t)e->amount, "balance_after",
			      (json_int_t)e->balance_after);
	char *text;

	if (o && e->transfer_id)
		json_object_set_new(o, "transfer_id", json_string(e->transfer_id));
	if (o && e->counterparty)
		json_object_set_new(o, "counterparty", json_string(e->counterparty));
	if (o && e->reference && json_object_set_new(o, "reference", json_string(e->reference))) {
		json_decref(o);
		return NULL; /* jansson refuses a string that is not UTF-8 */
	}
	if (o)
		json_object_set_new(o, "at", json_string(e->at));
	text = o ? json_dumps(o, JSON_COMPACT) : NULL;
	json_decref(o);
	return text;
}

static void assert_entry_like_jansson(const char *reference)
{
	struct readmodel_entry e = {
		.version = 7,
		.type = "transfer_out",
		.amount = INT64_MAX,
		.balance_after = INT64_MIN,
		.transfer_id = "t-1",
		.counterparty = "b",
		.reference = reference,
		.at = "2026-11-26T15:32:21.123456Z",
	};
	char *ours = readmodel_entry_json(&e), *theirs = jansson_entry(&e);

	if (!theirs)
		cr_assert_null(ours, "jansson refuses reference %s, so must we", reference);
	else
		cr_assert_str_eq(ours, theirs);
	free(ours);
	free(theirs);
}

Test(readmodel, strings_are_escaped_as_jansson_escapes_them)
{
	char one[2] = { 0 };
	const char *texts[] = {
		"",
		"plain",
		"with \"quotes\" and \\ back\\slash",
		"tab\tnew\nline\rcr\bbs\fff",
		"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xe2\x80\xa8 slash/ del\x7f",
		"\xff",
		"\xc3",
		"\xc0\xaf",
		"\xed\xa0\x80",
		"\xf4\x90\x80\x80",
		"ok\xe2\x82",
	};

	for (int c = 1; c < 0x80; c++) {
		one[0] = (char)c;
		assert_entry_like_jansson(one);
	}
	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
		assert_entry_like_jansson(texts[i]);
}

Test(readmodel, bodies_match_jansson_with_and_without_optional_members)
{
	struct readmodel_entry deposit = { .version = 1,
					   .type = "deposit",
					   .amount = 5,
					   .balance_after = 5,
					   .at = "2000-01-01T00:00:00.000000Z" };
	struct readmodel_account a = { .account_id = "alice",
				       .name = "Alice \"A\"",
				       .currency = "EUR",
				       .status = "open",
				       .balance = -3,
				       .overdraft_limit = 100,
				       .version = 12,
				       .opened_at = "x",
				       .updated_at = "y" };
	struct readmodel_transfer t = { .transfer_id = "t",
					.from = "a",
					.to = "b",
					.currency = "EUR",
					.reference = NULL,
					.at = "z",
					.amount = 9 };
	json_t *ja = json_pack("{s:s, s:s, s:s, s:I, s:I, s:s, s:I, s:s, s:s}", "account_id",
			       "alice", "name", "Alice \"A\"", "currency", "EUR", "balance",
			       (json_int_t)-3, "overdraft_limit", (json_int_t)100, "status", "open",
			       "version", (json_int_t)12, "opened_at", "x", "updated_at", "y");
	json_t *jt = json_pack("{s:s, s:s, s:s, s:I, s:s, s:n, s:s}", "transfer_id", "t", "from",
			       "a", "to", "b", "amount", (json_int_t)9, "currency", "EUR",
			       "reference", "at", "z");
	char *ours, *theirs;

	ours = readmodel_entry_json(&deposit);
	theirs = jansson_entry(&deposit);
	cr_assert_str_eq(ours, theirs);
	free(ours);
	free(theirs);
	ours = readmodel_account_json(&a);
	theirs = json_dumps(ja, JSON_COMPACT);
	cr_assert_str_eq(ours, theirs);
	free(ours);
	free(theirs);
	ours = readmodel_transfer_json(&t);
	theirs = json_dumps(jt, JSON_COMPACT);
	cr_assert_str_eq(ours, theirs);
	free(ours);
	free(theirs);
	json_decref(ja);
	json_decref(jt);
}

Test(readmodel, item_version_is_read_from_the_items_own_prefix)
{
	struct readmodel_entry e = { .version = 2147483647,
				     .type = "deposit",
				     .amount = 5,
				     .balance_after = 5,
				     .at = "2026-01-01T00:00:00.000000Z" };
	char *json = readmodel_entry_json(&e);

	cr_assert_eq(readmodel_item_version(json), 2147483647);
	free(json);
	cr_assert_eq(readmodel_item_version("{\"version\":7,\"type\":\"x\"}"), 7);
	cr_assert_eq(readmodel_item_version("{\"version\":7}"), -1);
	cr_assert_eq(readmodel_item_version("{\"version\":,"), -1);
	cr_assert_eq(readmodel_item_version("{\"version\":-3,"), -1);
	cr_assert_eq(readmodel_item_version("{\"type\":\"x\",\"version\":7,"), -1);
	cr_assert_eq(readmodel_item_version("{}"), -1);
	cr_assert_eq(readmodel_item_version(""), -1);
	cr_assert_eq(readmodel_item_version(NULL), -1);
	cr_assert_eq(readmodel_item_version("{\"version\":99999999999999999999,"), -1);
}

/* GET /totals: every currency there can be, each with the longest numbers its types
 * allow, renders whole (no buffer sized by a guess), and the text is what jansson
 * reads back. */
Test(readmodel, totals_of_every_currency_with_the_longest_numbers_render_whole)
{
	enum { N = 26 * 26 * 26 };
	static struct readmodel_total rows[N];
	static char cur[N][4];
	char sum[48], first[256], *json;
	json_t *doc, *list;

	readmodel_int128_text(-((__int128)INT64_MAX * INT64_MAX), sum);
	for (int i = 0; i < N; i++) {
		snprintf(cur[i], sizeof(cur[i]), "%c%c%c", 'A' + i / 676, 'A' + i / 26 % 26,
			 'A' + i % 26);
		rows[i] = (struct readmodel_total){ .currency = cur[i],
						    .accounts = "9223372036854775807",
						    .open_accounts = "-9223372036854775808",
						    .balance_sum = sum };
	}
	json = readmodel_totals_json(rows, N);
	cr_assert_not_null(json);
	snprintf(first, sizeof(first),
		 "{\"currencies\":[{\"currency\":\"AAA\",\"accounts\":9223372036854775807,"
		 "\"open_accounts\":-9223372036854775808,\"balance_sum\":%s},{",
		 sum);
	cr_assert(strncmp(json, first, strlen(first)) == 0, "%.300s", json);
	cr_assert(strstr(json, "{\"currency\":\"ZZZ\",") &&
		  strcmp(json + strlen(json) - 3, "}]}") == 0);
	doc = json_loads(json, JSON_DECODE_INT_AS_REAL, NULL);
	cr_assert_not_null(doc, "not JSON");
	list = json_object_get(doc, "currencies");
	cr_assert_eq(json_array_size(list), N);
	cr_assert_str_eq(json_string_value(
				 json_object_get(json_array_get(list, N - 1), "currency")),
			 "ZZZ");
	json_decref(doc);
	free(json);
	json = readmodel_totals_json(NULL, 0);
	cr_assert_str_eq(json, "{\"currencies\":[]}");
	free(json);
	/* What is not a currency or an integer is refused, not spliced in. */
	rows[0].balance_sum = "1e3";
	cr_assert_null(readmodel_totals_json(rows, 1));
	rows[0].balance_sum = "12";
	rows[0].currency = "EU\"";
	cr_assert_null(readmodel_totals_json(rows, 1));
}

/* --- http query strings ------------------------------------------------------------- */

Test(http_query, pairs_are_split_and_percent_decoded)
{
	struct http_query_param *p;
	size_t n;
	char err[256] = "";

	cr_assert_eq(http_query_parse("a=1&&b=x%2Fy+z&c=&d=%C3%BC", NULL, &p, &n, err, sizeof(err)),
		     0, "%s", err);
	cr_assert_eq(n, 4);
	cr_assert_str_eq(p[0].name, "a");
	cr_assert_str_eq(p[0].value, "1");
	cr_assert_str_eq(p[1].value, "x/y z");
	cr_assert_str_eq(p[2].name, "c");
	cr_assert_str_eq(p[2].value, "");
	cr_assert_str_eq(p[3].value, "\xc3\xbc");
	free(p);
	cr_assert_eq(http_query_parse(NULL, "", &p, &n, err, sizeof(err)), 0);
	cr_assert_null(p);
	cr_assert_eq(http_query_parse("", "", &p, &n, err, sizeof(err)), 0);
	cr_assert_eq(n, 0);
	cr_assert_eq(http_query_parse("wait_ms=5&min_position=1.2", "min_position wait_ms", &p, &n,
				      err, sizeof(err)),
		     0, "%s", err);
	cr_assert_eq(n, 2);
	free(p);
}

Test(http_query, malformed_repeated_unlisted_and_too_many_are_refused_naming_the_problem)
{
	static const struct {
		const char *q, *allowed, *says;
	} bad[] = {
		{ "a=%zz", NULL, "'%' must be followed" },
		{ "a=1%", NULL, "'%' must be followed" },
		{ "a=%4", NULL, "'%' must be followed" },
		{ "a=%00", NULL, "not encode NUL" },
		{ "%zz=1", NULL, "'%' must be followed" },
		{ "a=1&stale", NULL, "'stale' has no '=value'" },
		{ "a=1&a=2", NULL, "'a' is given more than once" },
		{ "a=1&%61=2", NULL, "'a' is given more than once" },
		{ "limit=1&colour=red", "limit before", "unknown query parameter 'colour'" },
		{ "x=1", "", "accepts none" },
		{ "%01%ff=1", "a",
		  "unknown query parameter '?"
		  "?'" },
	};
	struct http_query_param *p;
	size_t n;
	char err[256], many[512] = "a0=0";

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		cr_assert_eq(http_query_parse(bad[i].q, bad[i].allowed, &p, &n, err, sizeof(err)),
			     -EINVAL, "'%s' was accepted", bad[i].q);
		cr_assert_null(p);
		cr_assert_not_null(strstr(err, bad[i].says), "'%s': '%s' should say '%s'", bad[i].q,
				   err, bad[i].says);
	}
	for (int i = 1; i <= HTTP_QUERY_PARAMS_MAX; i++)
		snprintf(many + strlen(many), sizeof(many) - strlen(many), "&a%d=%d", i, i);
	cr_assert_eq(http_query_parse(many, NULL, &p, &n, err, sizeof(err)), -EINVAL);
	cr_assert_not_null(strstr(err, "more than 32 parameters"), "%s", err);
}

/* --- http problem details --------------------------------------------------------- */

Test(http_problem, every_member_survives_texts_that_are_not_utf8)
{
	json_t *p = http_problem_json(404, "not_found", "Not \xc3", "no route for GET /\xff\xfe\n");
	char *text = p ? json_dumps(p, JSON_COMPACT) : NULL;

	cr_assert_not_null(text, "no problem object for a detail that is not UTF-8");
	cr_assert_str_eq(text, "{\"type\":\"https://daybook.dev/problems/not_found\","
			       "\"title\":\"Not \xef\xbf\xbd\",\"status\":404,"
			       "\"detail\":\"no route for GET /\xef\xbf\xbd\xef\xbf\xbd\","
			       "\"code\":\"not_found\"}");
	free(text);
	json_decref(p);
}

/* RFC 3339 times as time travel's `at` takes them, back in the read models' format. */
static void assert_parsed(const char *in, const char *want)
{
	int64_t us;
	char out[READMODEL_TIME_LEN];

	cr_assert(readmodel_time_parse(in, &us), "refused %s", in);
	readmodel_time_text(us, out);
	cr_assert_str_eq(out, want, "%s", in);
}

Test(readmodel_time, rfc3339_times_read_as_utc_to_the_microsecond)
{
	assert_parsed("2026-01-31T23:59:59Z", "2026-01-31T23:59:59.000000Z");
	assert_parsed("2026-01-31t23:59:59.5z", "2026-01-31T23:59:59.500000Z");
	assert_parsed("2026-01-31 23:59:59.123456789Z", "2026-01-31T23:59:59.123456Z");
	assert_parsed("2026-03-01T00:30:00+01:00", "2026-02-28T23:30:00.000000Z");
	assert_parsed("2026-03-01T00:30:00 01:00",
		      "2026-02-28T23:30:00.000000Z"); /* '+' unencoded */
	assert_parsed("2024-02-28T23:00:00-01:30", "2024-02-29T00:30:00.000000Z");
	assert_parsed("2000-01-01T00:00:00Z", "2000-01-01T00:00:00.000000Z");
	assert_parsed("1999-12-31T23:59:59.999999Z", "1999-12-31T23:59:59.999999Z");
	assert_parsed("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000Z");
	assert_parsed("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z");
}

Test(readmodel_time, malformed_or_out_of_range_times_are_refused)
{
	static const char *const bad[] = {
		"",
		"2026",
		"2026-01-31",
		"2026-01-31T23:59:59",
		"2026-01-31T23:59Z",
		"2026-01-31T23:59:59.Z",
		"2026-01-31T23:59:59ZZ",
		"2026-13-01T00:00:00Z",
		"2026-00-01T00:00:00Z",
		"2026-02-29T00:00:00Z",
		"2100-02-29T00:00:00Z",
		"2026-04-31T00:00:00Z",
		"2026-01-31T24:00:00Z",
		"2026-01-31T23:60:00Z",
		"2026-01-31T23:59:60Z",
		"2026-01-31X23:59:59Z",
		"2026-01-31T23:59:59+1:00",
		"2026-01-31T23:59:59+24:00",
		"2026-01-31T23:59:59+01:60",
		"2026-01-31T23:59:59+0100",
		"0000-12-31T23:59:59Z",
		"0001-01-01T00:00:00+00:01",
		"9999-12-31T23:59:59-00:01",
		"+2026-01-31T23:59:59Z",
		"2026-01-31T23:59:59Z ",
		"２026-01-31T23:59:59Z",
	};
	int64_t us;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert(!readmodel_time_parse(bad[i], &us), "accepted '%s'", bad[i]);
}

/* --- what the HTTP edge's read path assumes of libevent ------------------------------ */

/* The read path's shortcuts into libevent's internals (http_conn.c) are built and used
 * on this libevent: were they not, every test would still pass, on libevent's own read
 * path, and only the system calls per request would tell. */
Test(http_conn, the_read_shortcuts_are_for_this_libevent_and_no_other)
{
	cr_assert(conns_libevent_fits(LIBEVENT_VERSION_NUMBER), "built against %s",
		  LIBEVENT_VERSION);
	cr_assert(conns_libevent_fits(event_get_version_number()), "libevent %s loaded",
		  event_get_version());
	cr_assert(conns_libevent_fits(0x02010c00)); /* 2.1.12-stable */
	cr_assert(conns_libevent_fits(0x02010800)); /* 2.1.8-stable */
	cr_assert_not(conns_libevent_fits(0x02010700));
	cr_assert_not(conns_libevent_fits(0x02001600)); /* 2.0.22 */
	cr_assert_not(conns_libevent_fits(0x02020100)); /* 2.2.1-alpha */
	cr_assert_not(conns_libevent_fits(0x03000000));
}

/* Where an event's callback ran in a turn: 1 first, 2 second. */
struct ran_at {
	int *turn_calls;
	int at;
};

static void note_order(evutil_socket_t fd, short what, void *arg)
{
	struct ran_at *r = arg;

	(void)fd;
	(void)what;
	r->at = ++*r->turn_calls;
}

/* The guard (http_conn.c) relies on libevent running the events of a descriptor in the
 * order last added first, as libevent 2.1's evmap does. */
Test(http_conn, libevent_runs_a_descriptors_last_added_event_first)
{
	struct event_base *base = service_event_base_new();
	int sv[2], calls = 0;
	struct ran_at ra = { &calls, 0 }, rb = { &calls, 0 };
	struct event *a, *b;

	cr_assert(base);
	cr_assert(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	a = event_new(base, sv[0], EV_READ | EV_PERSIST, note_order, &ra);
	b = event_new(base, sv[0], EV_READ | EV_PERSIST, note_order, &rb);
	cr_assert(a && b);
	cr_assert(send(sv[1], "x", 1, 0) == 1); /* never read: readable at every turn */
	cr_assert(event_add(a, NULL) == 0);
	cr_assert(event_add(b, NULL) == 0);
	cr_assert(event_base_loop(base, EVLOOP_ONCE) == 0);
	cr_assert(rb.at == 1 && ra.at == 2, "b, added last, ran at %d; a at %d", rb.at, ra.at);
	/* Taken out and added again: a is now the last added. */
	event_del(a);
	cr_assert(event_add(a, NULL) == 0);
	calls = 0;
	cr_assert(event_base_loop(base, EVLOOP_ONCE) == 0);
	cr_assert(ra.at == 1 && rb.at == 2, "a, added last, ran at %d; b at %d", ra.at, rb.at);
	event_free(a);
	event_free(b);
	event_base_free(base);
	close(sv[0]);
	close(sv[1]);
}

/* --- Sentinel discovery does not block the event loop ---------------------------- */

struct loop_probe {
	struct event_base *base;
	struct event *tick;
	double last, worst;
	int ticks;
};

static double mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void probe_tick(evutil_socket_t fd, short what, void *arg)
{
	struct loop_probe *p = arg;
	double t = mono();

	(void)fd;
	(void)what;
	if (t - p->last > p->worst)
		p->worst = t - p->last;
	p->last = t;
	if (++p->ticks >= 60) /* about 1.2 s of 20 ms ticks */
		event_base_loopbreak(p->base);
}

/* Sentinels that accept connections but never answer (a frozen Sentinel: its kernel
 * still completes the handshake): the query service's and the projector's loops must
 * keep running while the Redis connection looks for its primary. */
Test(redis, sentinel_discovery_does_not_block_the_event_loop)
{
	int fds[3];
	char url[256] = "redis-sentinel://";
	struct config_redis server;
	struct log log = { .service = "test", .level = LOG_ERROR };
	struct loop_probe p = { 0 };
	struct redis *r = NULL;
	struct redis_config rc = { 0 };
	struct timeval tv = { 0, 20000 };
	double t0, opened;

	for (int i = 0; i < 3; i++) {
		struct sockaddr_in a = { .sin_family = AF_INET,
					 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
		socklen_t len = sizeof(a);
		fds[i] = socket(AF_INET, SOCK_STREAM, 0);
		cr_assert(fds[i] >= 0);
		cr_assert(bind(fds[i], (struct sockaddr *)&a, sizeof(a)) == 0);
		cr_assert(listen(fds[i], 64) == 0); /* never accepted, never answered */
		cr_assert(getsockname(fds[i], (struct sockaddr *)&a, &len) == 0);
		snprintf(url + strlen(url), sizeof(url) - strlen(url), "%s127.0.0.1:%u",
			 i ? "," : "", (unsigned)ntohs(a.sin_port));
	}
	strcat(url, "/mymaster");
	cr_assert(config_parse_redis(url, &server));
	p.base = event_base_new();
	cr_assert(p.base);
	rc.server = &server;
	rc.base = p.base;
	rc.log = &log;
	t0 = mono();
	cr_assert(redis_open(&r, &rc) == 0);
	opened = mono() - t0;
	/* Bounds far from both sides: asking three silent Sentinels in turn blocks for
	 * about 0.9 s (300 ms each), while a loaded machine can delay a 20 ms tick by a
	 * tenth of a second or more without anything blocking. */
	cr_expect(opened < 0.5, "redis_open blocked for %.3f s asking silent Sentinels", opened);
	p.tick = event_new(p.base, -1, EV_PERSIST, probe_tick, &p);
	p.last = mono();
	evtimer_add(p.tick, &tv);
	event_base_dispatch(p.base);
	cr_expect(p.worst < 0.5, "the loop stalled for %.3f s while the Sentinels were asked",
		  p.worst);
	cr_expect(!redis_connected(r));
	cr_expect(strstr(redis_last_error(r), "Sentinel") != NULL, "error: %s",
		  redis_last_error(r));
	redis_close(&r);
	event_free(p.tick);
	event_base_free(p.base);
	for (int i = 0; i < 3; i++)
		close(fds[i]);
}

/* The hand-merged Sentinel parser takes the userinfo by the same rules as redis://
 * (which refuses "redis://u:p@ss@host:6379"): a raw '@' or space is not silently made
 * part of the password. */
Test(config, sentinel_urls_refuse_the_userinfo_redis_urls_refuse)
{
	const char *bad[] = { "redis-sentinel://u:p@ss@127.0.0.1:26379/daybook",
			      "redis-sentinel://us er:pw@127.0.0.1:26379/daybook",
			      "redis-sentinel://u:p#w@127.0.0.1:26379/daybook" };
	struct config_redis r;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char plain[256];
		snprintf(plain, sizeof(plain), "redis://%s", strchr(bad[i], '/') + 2);
		*strrchr(plain, '/') = '\0';
		cr_assert_not(config_parse_redis(plain, &r), "'%s' was accepted", plain);
		cr_expect_not(config_parse_redis(bad[i], &r), "'%s' was accepted", bad[i]);
	}
	cr_assert(config_parse_redis("redis-sentinel://u:p%40ss@127.0.0.1:26379/daybook", &r));
	cr_assert_str_eq(r.password, "p@ss");
}
