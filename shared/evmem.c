/* libevent's memory: blocks it frees are kept by size for its next allocations. */
#include "evmem.h"

#include <event2/event.h>
#include <stdbool.h>
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

/* Each thread's free blocks by class, a stack of pointers each: taking a block does not
 * read the block itself, which has usually left the CPU's caches since it was freed (a
 * list through the blocks stalled on that read: 5-6 % of the command's CPU). libevent
 * may allocate on any thread; a block freed on another thread than its own simply joins
 * that thread's stacks. */
struct stack {
	void **p;
	size_t n, cap;
};

static _Thread_local struct stack spares[NCLASSES];
static _Thread_local size_t kept;

void *evmem_malloc(size_t size)
{
	size_t cls = size <= EVMEM_CLASS_MAX ? (size + STEP - 1) / STEP : 0;
	size_t room = cls ? cls * STEP : size;
	struct head *h;

	if (cls == 0 && size == 0)
		cls = 1, room = STEP;
	if (cls && spares[cls].n > 0) {
		kept -= room;
		return spares[cls].p[--spares[cls].n];
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

/* Room on st for one more block; false when memory ran out. */
static bool stack_room(struct stack *st)
{
	size_t cap = st->cap ? 2 * st->cap : 64;
	void **grown;

	if (st->n < st->cap)
		return true;
	grown = realloc(st->p, cap * sizeof(*grown));
	if (!grown)
		return false;
	st->p = grown;
	st->cap = cap;
	return true;
}

void evmem_free(void *p)
{
	struct head *h;

	if (!p)
		return;
	h = (struct head *)p - 1;
	if (h->cls && kept + h->room <= EVMEM_KEEP_BYTES && stack_room(&spares[h->cls])) {
		spares[h->cls].p[spares[h->cls].n++] = p;
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
	/* Kept blocks would hide libevent's use of freed memory from the sanitizer (GCC
	 * says so with __SANITIZE_ADDRESS__, clang with __has_feature). */
#if defined(__SANITIZE_ADDRESS__)
	return;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
	return;
#endif
#endif
	event_set_mem_functions(evmem_malloc, evmem_realloc, evmem_free);
}
