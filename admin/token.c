/* daybook-admin token new: make an API token and its line for DAYBOOK_TOKENS_FILE. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#include "admin.h"
#include "cli.h"
#include "digest.h"
#include "ledger.h"

#define TOKEN_BYTES 32 /* 256 bits of randomness */

/* True when list is a comma-separated list of write, read, admin, each at most
 * once (the form shared/tokens.c accepts). */
static bool valid_scopes(const char *list)
{
	static const char *const names[] = { "write", "read", "admin" };
	bool seen[3] = { false, false, false };
	const char *p = list;

	if (!*p)
		return false;
	for (;;) {
		size_t len = strcspn(p, ",");
		size_t i;

		for (i = 0; i < 3; i++)
			if (len == strlen(names[i]) && strncmp(p, names[i], len) == 0)
				break;
		if (i == 3 || seen[i])
			return false;
		seen[i] = true;
		if (!p[len])
			return true;
		p += len + 1;
	}
}

static bool fill_random(unsigned char *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = getrandom(buf + done, len - done, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		done += (size_t)n;
	}
	return true;
}

int admin_token(struct admin_ctx *ctx, int argc, char **argv)
{
	static const struct option options[] = {
		{ "id", required_argument, NULL, 'i' },
		{ "scopes", required_argument, NULL, 's' },
		CLI_COMMON_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	const char *id = NULL, *scopes = NULL;
	unsigned char raw[TOKEN_BYTES], digest[DIGEST_SHA256_LEN];
	char token[4 + 2 * TOKEN_BYTES + 1], hex[DIGEST_SHA256_HEX_LEN + 1];
	int c;

	/* "token new --id ...": the word "new" first, then its options. */
	if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0))
		return admin_help("token");
	if (argc < 2 || strcmp(argv[1], "new") != 0)
		return admin_usage_error("token", "expected 'new'");
	argc--;
	argv++;
	while ((c = getopt_long(argc, argv, "+:i:s:h", options, NULL)) != -1) {
		switch (c) {
		case 'i':
			id = optarg;
			break;
		case 's':
			scopes = optarg;
			break;
		case 'h':
			return admin_help("token");
		default:
			return admin_getopt_error("token", argc, argv, c);
		}
	}
	if (optind < argc)
		return admin_usage_error("token", "unexpected argument '%s'", argv[optind]);
	if (!id || !scopes)
		return admin_usage_error("token", "both --id and --scopes are needed");
	if (!ledger_valid_id(id)) {
		log_error(&ctx->log, "--id must be 1-64 characters of "
				     "[A-Za-z0-9._:-]");
		return CLI_EXIT_USAGE;
	}
	if (!valid_scopes(scopes)) {
		log_error(&ctx->log, "--scopes must be a comma-separated list "
				     "of write, read, admin (each once)");
		return CLI_EXIT_USAGE;
	}
	if (!fill_random(raw, sizeof(raw))) {
		log_error(&ctx->log, "no random bytes: %s", strerror(errno));
		return CLI_EXIT_PROBLEM;
	}
	memcpy(token, "dbk_", 4);
	digest_hex(raw, sizeof(raw), token + 4);
	if (!digest_sha256(token, strlen(token), digest)) {
		log_error(&ctx->log, "cannot hash the token (out of memory)");
		return CLI_EXIT_PROBLEM;
	}
	digest_hex(digest, DIGEST_SHA256_LEN, hex);
	printf("%s\n%s %s %s\n", token, id, hex, scopes);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		log_error(&ctx->log, "writing the token failed");
		return CLI_EXIT_PROBLEM;
	}
	log_info(&ctx->log, "line 1 is the token, shown only now; add line 2 "
			    "to DAYBOOK_TOKENS_FILE and restart command and query");
	return CLI_EXIT_OK;
}
