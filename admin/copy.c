/* Rows for PostgreSQL in COPY's binary format, and a thread that COPYs them while the
 * caller works on the next ones: daybook-admin rebuild's writer. */
#include "copy.h"
#include "log.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define COPY_PIECE (1 << 20) /* bytes per PQputCopyData */

static const char copy_header[19] = "PGCOPY\n\377\r\n\0"; /* then flags and extension: 0 */

bool copy_reserve(struct copy_buf *b, size_t more)
{
	if (b->len + more <= b->cap)
		return true;
	size_t cap = b->cap ? b->cap : 1 << 16;
	while (cap < b->len + more)
		cap *= 2;
	char *p = realloc(b->p, cap);
	if (!p)
		return false;
	b->p = p;
	b->cap = cap;
	return true;
}

static void put_be(struct copy_buf *b, uint64_t v, int bytes)
{
	for (int i = bytes - 1; i >= 0; i--)
		b->p[b->len++] = (char)(v >> (8 * i));
}

/* A row of n fields; the first row of a COPY gets the header. */
bool copy_row(struct copy_buf *b, int n)
{
	if (!copy_reserve(b, sizeof(copy_header) + 2))
		return false;
	if (b->len == 0) {
		memcpy(b->p, copy_header, sizeof(copy_header));
		b->len = sizeof(copy_header);
	}
	put_be(b, (uint64_t)n, 2);
	return true;
}

/* A field's 4-byte length (or -1 for NULL) and 4- or 8-byte integer, big-endian, at p:
 * a few stores, as these run for every field of every row. */
static char *put32(char *p, uint32_t v)
{
	v = __builtin_bswap32(v);
	memcpy(p, &v, 4);
	return p + 4;
}

static char *put64(char *p, uint64_t v)
{
	v = __builtin_bswap64(v);
	memcpy(p, &v, 8);
	return p + 8;
}

/* A text field; NULL is SQL NULL. */
bool copy_text(struct copy_buf *b, const char *v)
{
	size_t n = v ? strlen(v) : 0;
	char *p;

	if (!copy_reserve(b, 4 + n))
		return false;
	p = put32(b->p + b->len, v ? (uint32_t)n : 0xffffffffu);
	memcpy(p, v ? v : "", n);
	b->len += 4 + n;
	return true;
}

/* An integer field of 4 or 8 bytes; timestamptz is an 8-byte integer too. */
bool copy_int(struct copy_buf *b, int64_t v, int bytes)
{
	char *p;

	if (!copy_reserve(b, 4 + (size_t)bytes))
		return false;
	p = put32(b->p + b->len, (uint32_t)bytes);
	if (bytes == 8)
		put64(p, (uint64_t)v);
	else
		put32(p, (uint32_t)v);
	b->len += 4 + (size_t)bytes;
	return true;
}

bool copy_in(PGconn *pg, const char *table, struct copy_buf *b, const struct log *log)
{
	char sql[128];
	PGresult *r;
	bool ok;

	if (b->len == 0)
		return true;
	if (!copy_reserve(b, 2))
		return false;
	put_be(b, 0xffff, 2); /* the trailer */
	snprintf(sql, sizeof(sql), "COPY %s FROM STDIN (FORMAT binary)", table);
	r = PQexec(pg, sql);
	ok = PQresultStatus(r) == PGRES_COPY_IN;
	PQclear(r);
	if (!ok)
		goto done;
	/* In pieces: a buffer can outgrow PQputCopyData's int. */
	for (size_t at = 0; at < b->len; at += COPY_PIECE) {
		size_t n = b->len - at < COPY_PIECE ? b->len - at : COPY_PIECE;
		if (PQputCopyData(pg, b->p + at, (int)n) != 1) {
			ok = false;
			break;
		}
	}
	if (PQputCopyEnd(pg, ok ? NULL : "the rebuild could not send its rows") != 1)
		ok = false;
	while ((r = PQgetResult(pg))) {
		ExecStatusType st = PQresultStatus(r);
		if (st != PGRES_COMMAND_OK)
			ok = false;
		PQclear(r);
		if (st == PGRES_COPY_IN) /* the end could not be sent: the connection is lost */
			break;
	}
done:
	if (!ok) {
		char pqline[1024];
		log_error(log, "COPY %s: %s", table,
			  log_oneline(PQerrorMessage(pg), pqline, sizeof(pqline)));
	}
	b->len = 0;
	return ok;
}

static void *copier_main(void *arg)
{
	struct copier *c = arg;

	pthread_mutex_lock(&c->mu);
	for (;;) {
		while (!c->busy && !c->stop)
			pthread_cond_wait(&c->cv, &c->mu);
		if (!c->busy)
			break;
		pthread_mutex_unlock(&c->mu);
		bool failed = !copy_in(c->pg, "rm_entries_shadow", &c->entries, c->log);
		pthread_mutex_lock(&c->mu);
		if (failed)
			c->failed = true;
		c->busy = false;
		pthread_cond_broadcast(&c->cv);
	}
	pthread_mutex_unlock(&c->mu);
	return NULL;
}

int copy_spawn(pthread_t *thread, void *(*fn)(void *), void *arg)
{
	sigset_t all, old;
	int err;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	err = pthread_create(thread, NULL, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return err;
}

/* Start the thread with signals blocked: they are the main thread's to handle. */
bool copier_start(struct copier *c, PGconn *pg)
{
	int err;

	c->pg = pg;
	pthread_mutex_init(&c->mu, NULL);
	pthread_cond_init(&c->cv, NULL);
	err = copy_spawn(&c->thread, copier_main, c);
	if (err) {
		log_error(c->log, "cannot start the COPY thread: %s", strerror(err));
		return false;
	}
	c->running = true;
	return true;
}

/* Hand the chunk's rows over (taking back the emptied buffer of the last chunk),
 * once the thread is done with the last chunk. */
bool copier_submit(struct copier *c, struct copy_buf *entries)
{
	struct copy_buf t;
	bool ok;

	pthread_mutex_lock(&c->mu);
	while (c->busy)
		pthread_cond_wait(&c->cv, &c->mu);
	ok = !c->failed;
	if (ok) {
		t = c->entries, c->entries = *entries, *entries = t;
		c->busy = true;
		pthread_cond_broadcast(&c->cv);
	}
	pthread_mutex_unlock(&c->mu);
	return ok;
}

/* Wait for the last chunk and end the thread; false when any COPY failed. */
bool copier_stop(struct copier *c)
{
	if (!c->running)
		return !c->failed;
	pthread_mutex_lock(&c->mu);
	c->stop = true;
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
	pthread_join(c->thread, NULL);
	pthread_mutex_destroy(&c->mu);
	pthread_cond_destroy(&c->cv);
	c->running = false;
	return !c->failed;
}
