/* API tokens: loaded from DAYBOOK_TOKENS_FILE by SHA-256 hash, checked in constant time. */
#include "tokens.h"

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "ledger.h"
#include "strmap.h"

struct tokens {
	struct token *items;
	size_t count;
};

static bool parse_hash(const char *hex, unsigned char out[DIGEST_SHA256_LEN])
{
	if (strlen(hex) != 2 * DIGEST_SHA256_LEN)
		return false;
	for (int i = 0; i < DIGEST_SHA256_LEN; i++) {
		int hi = digest_hex_digit(hex[2 * i]), lo = digest_hex_digit(hex[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return false;
		out[i] = (unsigned char)(hi << 4 | lo);
	}
	return true;
}

static bool parse_scopes(char *list, unsigned *out)
{
	char *save = NULL;

	*out = 0;
	if (list[0] == ',' || list[strlen(list) - 1] == ',' || strstr(list, ",,"))
		return false;
	for (char *s = strtok_r(list, ",", &save); s; s = strtok_r(NULL, ",", &save)) {
		if (strcmp(s, "write") == 0)
			*out |= SCOPE_WRITE;
		else if (strcmp(s, "read") == 0)
			*out |= SCOPE_READ;
		else if (strcmp(s, "admin") == 0)
			*out |= SCOPE_ADMIN;
		else
			return false;
	}
	return *out != 0;
}

/* Parse one non-comment line into tok; returns the reason on failure, NULL on success. */
static const char *parse_line(char *line, struct token *tok)
{
	char *save = NULL, *id, *hash, *scopes;

	id = strtok_r(line, " \t", &save);
	hash = strtok_r(NULL, " \t", &save);
	scopes = strtok_r(NULL, " \t", &save);
	if (!id || !hash || !scopes || strtok_r(NULL, " \t", &save))
		return "expected '<id> <sha256 hex> <scope>[,<scope>...]'";
	if (!ledger_valid_id(id))
		return "the id must be 1-64 characters of [A-Za-z0-9._:-]";
	if (!parse_hash(hash, tok->hash))
		return "the hash must be 64 hex digits (SHA-256 of the token)";
	if (!parse_scopes(scopes, &tok->scopes))
		return "scopes must be a comma-separated list of write, read, admin";
	strcpy(tok->id, id);
	return NULL;
}

static bool blank_or_comment(const char *line)
{
	while (isspace((unsigned char)*line))
		line++;
	return *line == '\0' || *line == '#';
}

int tokens_open(struct tokens **out, const char *path, char *err, size_t errlen)
{
	struct tokens *t = calloc(1, sizeof(*t));
	char line[1024];
	size_t cap = 0;
	int lineno = 0, rc = -EINVAL;
	FILE *f = fopen(path, "r");

	if (!f || !t) {
		rc = -errno;
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		goto fail;
	}
	while (fgets(line, sizeof(line), f)) {
		const char *why;
		lineno++;
		line[strcspn(line, "\r\n")] = '\0';
		if (blank_or_comment(line))
			continue;
		if (t->count == cap) {
			cap = cap ? 2 * cap : 8;
			struct token *items = realloc(t->items, cap * sizeof(*items));
			if (!items) {
				rc = -ENOMEM;
				snprintf(err, errlen, "%s: out of memory", path);
				goto fail;
			}
			t->items = items;
		}
		why = parse_line(line, &t->items[t->count]);
		if (why) {
			snprintf(err, errlen, "%s:%d: %s", path, lineno, why);
			goto fail;
		}
		t->count++;
	}
	fclose(f);
	*out = t;
	return 0;
fail:
	if (f)
		fclose(f);
	tokens_close(&t);
	return rc;
}

void tokens_close(struct tokens **tokens)
{
	if (!*tokens)
		return;
	free((*tokens)->items);
	free(*tokens);
	*tokens = NULL;
}

const struct token *tokens_find(const struct tokens *tokens, const char *secret, size_t len)
{
	unsigned char digest[DIGEST_SHA256_LEN];
	const struct token *found = NULL;

	/* Hashing first means the comparison never depends on the secret's bytes, and
	 * walking every entry means timing does not tell which one matched. */
	if (!digest_sha256(secret, len, digest))
		return NULL;
	for (size_t i = 0; i < tokens->count; i++)
		if (digest_equal(digest, tokens->items[i].hash, DIGEST_SHA256_LEN))
			found = &tokens->items[i];
	return found;
}

void tokens_memo_init(struct tokens_memo *m)
{
	unsigned char *b = (unsigned char *)m->key;
	size_t got = 0;

	memset(m, 0, sizeof(*m));
	while (got < sizeof(m->key)) {
		ssize_t n = getrandom(b + got, sizeof(m->key) - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return; /* unkeyed: every look-up goes the long way */
		got += (size_t)n;
	}
	m->keyed = true;
}

static void fingerprint(const struct tokens_memo *m, const char *secret, size_t len,
			uint64_t out[2])
{
	out[0] = strmap_siphash(m->key[0], m->key[1], secret, len, 1, 3);
	out[1] = strmap_siphash(m->key[2], m->key[3], secret, len, 1, 3);
}

const struct token *tokens_find_memo(const struct tokens *tokens, struct tokens_memo *m,
				     const char *secret, size_t len)
{
	uint64_t mark[2];
	const struct token *t;

	if (!m->keyed)
		return tokens_find(tokens, secret, len);
	fingerprint(m, secret, len, mark);
	if (m->token && digest_equal(mark, m->mark, sizeof(mark)))
		return m->token;
	t = tokens_find(tokens, secret, len);
	if (t) {
		memcpy(m->mark, mark, sizeof(mark));
		m->token = t;
	}
	return t;
}
