/* libevent's memory: blocks it frees are kept by size for its next allocations. */
#include "evmem.h"

#include <event2/event.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define STEP 16
#define NCLASSES (EVMEM_CLASS_MAX / STEP + 1)

/* In front of every block: its room (what it can hold) and its class (0: not kept,
 * larger than EVMEM_CLASS_MAX). 16 bytes, so the block stays aligned as malloc's. */
struct head {
	size_t room;
	size_t cls;
};

struct spare {
	struct spare *next;
};

/* Each thread's own free blocks, by class: libevent may allocate on any thread, and a
 * block freed on another thread than its own simply joins that thread's lists. */
static _Thread_local struct spare *spares[NCLASSES];
static _Thread_local size_t kept;

void *evmem_malloc(size_t size)
{
	size_t cls = size <= EVMEM_CLASS_MAX ? (size + STEP - 1) / STEP : 0;
	size_t room = cls ? cls * STEP : size;
	struct head *h;

	if (cls == 0 && size == 0)
		cls = 1, room = STEP;
	if (cls && spares[cls]) {
		struct spare *s = spares[cls];
		spares[cls] = s->next;
		kept -= room;
		return s;
	}
	if (room > SIZE_MAX - sizeof(*h))
		return NULL;
	h = malloc(sizeof(*h) + room);
	if (!h)
		return NULL;
	h->room = room;
	h->cls = cls;
	return h + 1;
}

void evmem_free(void *p)
{
	struct head *h;
	struct spare *s = p;

	if (!p)
		return;
	h = (struct head *)p - 1;
	if (h->cls && kept + h->room <= EVMEM_KEEP_BYTES) {
		s->next = spares[h->cls];
		spares[h->cls] = s;
		kept += h->room;
		return;
	}
	free(h);
}

void *evmem_realloc(void *p, size_t size)
{
	struct head *h;
	void *q;

	if (!p)
		return evmem_malloc(size);
	h = (struct head *)p - 1;
	if (size <= h->room)
		return p;
	q = evmem_malloc(size);
	if (!q)
		return NULL;
	memcpy(q, p, h->room);
	evmem_free(p);
	return q;
}

size_t evmem_kept(void)
{
	return kept;
}

void evmem_install(void)
{
#if defined(__SANITIZE_ADDRESS__)
	/* Kept blocks would hide libevent's use of freed memory from the sanitizer. */
	return;
#endif
	event_set_mem_functions(evmem_malloc, evmem_realloc, evmem_free);
}
