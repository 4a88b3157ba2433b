/* daybook-admin token new: make an API token and its line for DAYBOOK_TOKENS_FILE. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#include "admin.h"
#include "ledger.h"
#include "sha256.h"

#define TOKEN_BYTES 32 /* 256 bits of randomness */
_Static_assert(TOKEN_BYTES == SHA256_DIGEST_LEN, "the token is written with sha256_hex");

static const char token_usage[] =
	"usage: daybook-admin token new --id ID --scopes SCOPE[,SCOPE...]\n"
	"  Prints a new API token (line 1) and its line for DAYBOOK_TOKENS_FILE (line 2):\n"
	"  '<id> <sha256 hex> <scopes>'. The token itself is stored nowhere: give it to\n"
	"  the client now. SCOPE is write, read or admin. Needs no database.\n";

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
	const char *id = NULL, *scopes = NULL;
	unsigned char raw[TOKEN_BYTES], digest[SHA256_DIGEST_LEN];
	char token[4 + 2 * TOKEN_BYTES + 1], hex[2 * SHA256_DIGEST_LEN + 1];

	(void)ctx;
	if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
		fputs(token_usage, stdout);
		return 0;
	}
	if (argc < 2 || strcmp(argv[1], "new") != 0)
		goto usage;
	for (int i = 2; i < argc; i++) {
		if (strcmp(argv[i], "--id") == 0 && i + 1 < argc)
			id = argv[++i];
		else if (strcmp(argv[i], "--scopes") == 0 && i + 1 < argc)
			scopes = argv[++i];
		else
			goto usage;
	}
	if (!id || !scopes)
		goto usage;
	if (!ledger_valid_id(id)) {
		fprintf(stderr, "daybook-admin token: --id must be 1-64 characters of "
				"[A-Za-z0-9._:-]\n");
		return 2;
	}
	if (!valid_scopes(scopes)) {
		fprintf(stderr, "daybook-admin token: --scopes must be a comma-separated list "
				"of write, read, admin (each once)\n");
		return 2;
	}
	if (!fill_random(raw, sizeof(raw))) {
		fprintf(stderr, "daybook-admin token: no random bytes: %s\n", strerror(errno));
		return 1;
	}
	memcpy(token, "dbk_", 4);
	sha256_hex(raw, token + 4);
	sha256(token, strlen(token), digest);
	sha256_hex(digest, hex);
	printf("%s\n%s %s %s\n", token, id, hex, scopes);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		fprintf(stderr, "daybook-admin token: writing the token failed\n");
		return 1;
	}
	fprintf(stderr, "daybook-admin token: line 1 is the token, shown only now; add line 2 "
			"to DAYBOOK_TOKENS_FILE and restart command and query\n");
	return 0;
usage:
	fputs(token_usage, stderr);
	return 2;
}
