/* API tokens: loaded from DAYBOOK_TOKENS_FILE by SHA-256 hash, checked in constant time. */
#ifndef DAYBOOK_TOKENS_H
#define DAYBOOK_TOKENS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

/* The last secret that matched a token, remembered by a keyed fingerprint, never as
 * the secret itself (a copy kept for the process's life would be in every memory dump
 * or core file; the request's own bytes, like any freed memory, last only until the
 * memory is used again): a client sends the same token with every request, and SHA-256
 * of it each time is most of the check's cost. The fingerprint is 128 bits, two SipHash-1-3
 * under random keys of the memo's own: nobody without the keys can make another
 * secret that matches it, and nobody with them learns the secret but by guessing it. */
struct tokens_memo {
	uint64_t key[4];
	uint64_t mark[2];
	const struct token *token; /* NULL: nothing remembered */
	bool keyed;                /* false: the random source failed; nothing is remembered */
};

/* Draw the memo's keys; the memo then remembers nothing yet. */
void tokens_memo_init(struct tokens_memo *m);

/* tokens_find, answered from the memo when `secret` is the one it remembers; a match
 * found the long way is remembered. The result lives as long as the tokens. */
const struct token *tokens_find_memo(const struct tokens *tokens, struct tokens_memo *m,
				     const char *secret, size_t len);

#endif
