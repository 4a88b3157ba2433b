/* libevent's memory: blocks it frees are kept by size for its next allocations.
 *
 * A write request costs evhttp about 45 small allocations (the request, its header
 * lists with a copy of every name and value, the URI, buffer chains), and the command
 * answers a batch of requests at once: their blocks are made and freed by the hundred
 * of each size, far more than glibc's per-thread cache keeps (7 of a size), so most of
 * them went through malloc's slower paths (about a fifth of the process's CPU). */
#ifndef DAYBOOK_EVMEM_H
#define DAYBOOK_EVMEM_H

#include <stddef.h>

/* Blocks up to this size are kept, in classes 16 bytes apart. */
#define EVMEM_CLASS_MAX 4096
/* Bytes of free blocks a thread keeps at most; past it they go back to malloc. */
#define EVMEM_KEEP_BYTES (4 * 1024 * 1024)

/* Make libevent allocate through evmem_malloc, evmem_realloc and evmem_free. Call it
 * first thing in main, before any libevent call: memory libevent allocated before would
 * be freed wrongly after. The rule that goes with it: a process that installs evmem
 * never takes ownership of memory libevent allocated (evhttp_uridecode, evbuffer_readln
 * and the like hand the caller a block to free): neither free() nor evmem_free() is
 * right for it in every build (under AddressSanitizer evmem is not installed). The
 * one such call the command had, in config.c, decodes by hand instead. */
void evmem_install(void);

/* malloc, realloc and free with the kept blocks: each block carries its size class in
 * front of it, so these three only go together. */
void *evmem_malloc(size_t size);
void *evmem_realloc(void *p, size_t size);
void evmem_free(void *p);

/* Bytes of free blocks the calling thread keeps (for tests). */
size_t evmem_kept(void);

#endif
