/* Fuzz harness for the HTTP query-string parser (http_query_parse), which every route
 * runs on what a client sends before its handler sees anything.
 *
 * As a libFuzzer target (clang; the flag drops the corpus runner's main below):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -DDAYBOOK_LIBFUZZER -D_GNU_SOURCE \
 *     -Ishared tests/fuzz/fuzz_query.c shared/http.c shared/http_conn.c shared/metrics.c \
 *     shared/log.c shared/tokens.c shared/sha256.c \
 *     $(pkg-config --cflags --libs jansson libevent) -o /tmp/fuzz_query
 *   mkdir -p /tmp/fuzz-query && /tmp/fuzz_query -max_len=2048 /tmp/fuzz-query tests/fuzz/query_corpus
 *
 * Built normally, main() runs every file (or every file in every directory) named on
 * the command line, and every prefix of each, through the same checks: the meson test
 * `fuzz_query_corpus` does so for tests/fuzz/query_corpus. A broken invariant aborts.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "http_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                        \
	do {                                                                               \
		if (!(cond)) {                                                             \
			fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, #cond); \
			abort();                                                           \
		}                                                                          \
	} while (0)

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

#ifndef DAYBOOK_LIBFUZZER

/* Runs one input whole and every prefix of it (cut-off escapes come for free). */
static int run_file(const char *path)
{
	FILE *f = fopen(path, "rb"); /* one corpus input */
	uint8_t *buf;
	long len;

	if (!f) {
		perror(path);
		return -1;
	}
	if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 ||
	    !(buf = malloc((size_t)len + 1)) || fread(buf, 1, (size_t)len, f) != (size_t)len) {
		fprintf(stderr, "%s: cannot read\n", path);
		fclose(f);
		return -1;
	}
	fclose(f);
	for (size_t n = 0; n <= (size_t)len; n++)
		LLVMFuzzerTestOneInput(buf, n);
	free(buf);
	return 0;
}

/* Runs every regular file of dir; returns how many, or -1 on an error. */
static int run_dir(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int count = 0;

	if (!d) {
		perror(dir);
		return -1;
	}
	while ((e = readdir(d))) {
		char path[4096];
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		if (run_file(path) != 0) {
			count = -1;
			break;
		}
		count++;
	}
	closedir(d);
	return count;
}

int main(int argc, char **argv)
{
	int total = 0;

	if (argc < 2) {
		fprintf(stderr, "usage: %s FILE-OR-DIR...\n", argv[0]);
		return 2;
	}
	for (int i = 1; i < argc; i++) {
		struct stat st;
		int n;

		if (stat(argv[i], &st) != 0) {
			perror(argv[i]);
			return 1;
		}
		n = S_ISDIR(st.st_mode) ? run_dir(argv[i]) : run_file(argv[i]) == 0 ? 1 : -1;
		if (n < 0)
			return 1;
		total += n;
	}
	/* An empty run proves nothing: treat a missing corpus as a failure. */
	if (total == 0) {
		fprintf(stderr, "no inputs found\n");
		return 1;
	}
	printf("%d inputs ran clean\n", total);
	return 0;
}

#endif
