/* What every fuzz harness of tests/fuzz shares: the libFuzzer entry point each one
 * defines, and CHECK for the invariants it asserts (a broken one aborts). */
#ifndef DAYBOOK_FUZZ_H
#define DAYBOOK_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__,       \
				#cond);                                                            \
			abort();                                                                   \
		}                                                                                  \
	} while (0)

#endif
