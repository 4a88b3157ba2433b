/* SHA-256 and constant-time comparison, from libcrypto (OpenSSL). */
#include "digest.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <string.h>

bool digest_sha256(const void *data, size_t len, unsigned char out[DIGEST_SHA256_LEN])
{
	return digest_sha256_parts(1, &data, &len, out);
}

bool digest_sha256_parts(size_t n, const void *const parts[], const size_t lens[],
			 unsigned char out[DIGEST_SHA256_LEN])
{
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	unsigned int outlen = 0;
	bool ok = false;

	if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
		goto done;
	for (size_t i = 0; i < n; i++)
		if (EVP_DigestUpdate(ctx, parts[i], lens[i]) != 1)
			goto done;
	ok = EVP_DigestFinal_ex(ctx, out, &outlen) == 1 && outlen == DIGEST_SHA256_LEN;
done:
	EVP_MD_CTX_free(ctx);
	if (!ok)
		memset(out, 0, DIGEST_SHA256_LEN);
	return ok;
}

void digest_hex(const unsigned char *bytes, size_t len, char *out)
{
	static const char hex[] = "0123456789abcdef";

	for (size_t i = 0; i < len; i++) {
		out[2 * i] = hex[bytes[i] >> 4];
		out[2 * i + 1] = hex[bytes[i] & 15];
	}
	out[2 * len] = '\0';
}

int digest_hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

bool digest_equal(const void *a, const void *b, size_t len)
{
	return CRYPTO_memcmp(a, b, len) == 0;
}
