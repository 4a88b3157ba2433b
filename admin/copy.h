/* Rows for PostgreSQL in COPY's binary format: nothing to escape on our side and
 * nothing to parse on the server's (integers and times go as they are stored), and a
 * thread that COPYs a chunk's rows while the caller folds the next chunk. */
#ifndef DAYBOOK_ADMIN_COPY_H
#define DAYBOOK_ADMIN_COPY_H

#include <libpq-fe.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "log.h"

/* The COPY data of one table; the caller frees p. Zeroed is empty. */
struct copy_buf {
	char *p;
	size_t len, cap;
};

/* Start a row of n fields, then add each field in the table's column order: text
 * (NULL is SQL NULL), or an integer of 4 or 8 bytes (a timestamptz is microseconds
 * since 2000-01-01 UTC, 8 bytes). False when out of memory. */
bool copy_row(struct copy_buf *b, int n) __attribute__((warn_unused_result));
/* Room for more bytes after len, for a caller that writes them itself (the buffer
 * serves as a plain growable one too). */
bool copy_reserve(struct copy_buf *b, size_t more) __attribute__((warn_unused_result));
bool copy_text(struct copy_buf *b, const char *v) __attribute__((warn_unused_result));
bool copy_int(struct copy_buf *b, int64_t v, int bytes) __attribute__((warn_unused_result));

/* COPY the rows into table over pg (idle, not in pipeline mode) and empty b; a failure
 * is said in log. Nothing to do for an empty b. */
bool copy_in(PGconn *pg, const char *table, struct copy_buf *b, const struct log *log)
	__attribute__((warn_unused_result));

/* A thread that COPYs rm_entries_shadow rows over pg, which is its own from start to
 * stop. Zeroed before start. */
struct copier {
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	PGconn *pg;
	const struct log *log;   /* where a failure is said; set before start */
	struct copy_buf entries; /* the rows it works on; freed by the caller */
	bool running, busy, stop, failed;
};

/* Start a thread running fn(arg) with every signal blocked: signals are the main
 * thread's to handle. pthread_create's result (0 when started). */
int copy_spawn(pthread_t *thread, void *(*fn)(void *), void *arg)
	__attribute__((warn_unused_result));

/* Start it (with signals blocked: they are the caller's thread's to handle). */
bool copier_start(struct copier *c, PGconn *pg) __attribute__((warn_unused_result));
/* Hand a chunk's rows over once the last chunk is done: *entries is swapped with the
 * thread's emptied buffer. False once any COPY has failed. */
bool copier_submit(struct copier *c, struct copy_buf *entries) __attribute__((warn_unused_result));
/* Wait for the last chunk and end the thread; false when any COPY failed. */
bool copier_stop(struct copier *c);

#endif
