/* Fuzz harness for the HTTP query-string parser (http_query_parse), which every route
 * runs on what a client sends before its handler sees anything.
 *
 * As a libFuzzer target (clang; libFuzzer brings main, so without corpus_runner.c):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE \
 *     -Ishared -Itests/fuzz tests/fuzz/fuzz_query.c shared/http.c shared/http_conn.c \
 *     shared/http_problem.c \
 *     shared/metrics.c \
 *     shared/log.c shared/tokens.c shared/digest.c \
 *     $(pkg-config --cflags --libs jansson libevent libcrypto) -o /tmp/fuzz_query
 *   mkdir -p /tmp/fuzz-query && /tmp/fuzz_query -max_len=2048 /tmp/fuzz-query tests/fuzz/query_corpus
 *
 * Linked with tests/fuzz/corpus_runner.c, main() runs every file (or every file in every directory) named on
 * the command line, and every prefix of each, through the same checks: the meson test
 * `fuzz_query_corpus` does so for tests/fuzz/query_corpus. A broken invariant aborts.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "http_internal.h"

static bool listed(const char *list, const char *name)
{
	size_t n = strlen(name);

	for (const char *p = list; *p;) {
		size_t len = strcspn(p, " ");
		if (len == n && strncmp(p, name, n) == 0)
			return true;
		p += len + (p[len] == ' ');
	}
	return false;
}

static void check(const char *q, const char *allowed)
{
	struct http_query_param *p = (struct http_query_param *)1;
	size_t n = 99;
	char err[256];
	int rc;

	memset(err, 'x', sizeof(err));
	rc = http_query_parse(q, allowed, &p, &n, err, sizeof(err));
	CHECK(rc == 0 || rc == -EINVAL || rc == -ENOMEM);
	if (rc != 0) {
		size_t len = strnlen(err, sizeof(err));
		CHECK(p == NULL && n == 0);
		if (rc == -EINVAL) {
			/* One printable line, which the 400's detail can carry as is. */
			CHECK(len > 0 && len < sizeof(err));
			for (size_t i = 0; i < len; i++)
				CHECK(err[i] >= 0x20 && err[i] < 0x7f);
		}
		return;
	}
	CHECK(n <= HTTP_QUERY_PARAMS_MAX);
	CHECK((n == 0) == (p == NULL));
	for (size_t i = 0; i < n; i++) {
		CHECK(!allowed || listed(allowed, p[i].name));
		for (size_t j = 0; j < i; j++)
			CHECK(strcmp(p[i].name, p[j].name) != 0);
		/* Decoding only shrinks: nothing decoded is longer than the input. */
		CHECK(strlen(p[i].name) + strlen(p[i].value) < strlen(q));
	}
	free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *q = malloc(size + 1);

	if (!q)
		return 0;
	memcpy(q, data, size);
	q[size] = '\0'; /* the query string reaches the parser as a C string */
	check(q, NULL);
	check(q, "min_position wait_ms limit before");
	check(q, "");
	free(q);
	return 0;
}
