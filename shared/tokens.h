/* API tokens: loaded from DAYBOOK_TOKENS_FILE by SHA-256 hash, checked in constant time. */
#ifndef DAYBOOK_TOKENS_H
#define DAYBOOK_TOKENS_H

#include <stdbool.h>
#include <stddef.h>

#include "digest.h"

enum token_scope {
	SCOPE_WRITE = 1 << 0,
	SCOPE_READ = 1 << 1,
	SCOPE_ADMIN = 1 << 2,
};

struct token {
	char id[65];
	unsigned char hash[DIGEST_SHA256_LEN];
	unsigned scopes;
};

struct tokens;

/* Load the file: one token a line, "<id> <sha256 hex> <scope>[,<scope>...]", with
 * '#' comments and blank lines. On failure writes "path:line: reason" into err.
 * Caller frees with tokens_close. */
int tokens_open(struct tokens **out, const char *path, char *err, size_t errlen)
	__attribute__((warn_unused_result));
void tokens_close(struct tokens **tokens);

/* The token whose hash matches `secret`, or NULL. Every entry is compared, in
 * constant time, whatever matches. The result lives as long as the tokens. */
const struct token *tokens_find(const struct tokens *tokens, const char *secret, size_t len);

#endif
