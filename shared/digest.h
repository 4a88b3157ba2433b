/* SHA-256 and constant-time comparison, from libcrypto (OpenSSL): token hashes,
 * idempotency request fingerprints, migration checksums. */
#ifndef DAYBOOK_DIGEST_H
#define DAYBOOK_DIGEST_H

#include <stdbool.h>
#include <stddef.h>

#define DIGEST_SHA256_LEN 32
#define DIGEST_SHA256_HEX_LEN (2 * DIGEST_SHA256_LEN) /* without the NUL */

/* SHA-256 of data[0, len) into out (EVP_Digest). False only when libcrypto fails
 * (out of memory); out is then zeroed. */
bool digest_sha256(const void *data, size_t len, unsigned char out[DIGEST_SHA256_LEN])
	__attribute__((warn_unused_result));
/* SHA-256 of the concatenation of n parts (parts[i], lens[i] bytes each). */
bool digest_sha256_parts(size_t n, const void *const parts[], const size_t lens[],
			 unsigned char out[DIGEST_SHA256_LEN]) __attribute__((warn_unused_result));
/* Lower-case hex of len bytes into out (2 * len + 1 bytes with the NUL). */
void digest_hex(const unsigned char *bytes, size_t len, char *out);
/* The value of one hex digit, either case; -1 for anything else. */
int digest_hex_digit(char c);
/* True when a[0, len) equals b[0, len); the time taken does not depend on the bytes
 * (CRYPTO_memcmp). */
bool digest_equal(const void *a, const void *b, size_t len);

#endif
