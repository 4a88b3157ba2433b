/* The columns of a set-based statement: text[] literals built value by value, then
 * queued as one statement's parameters (the batch's events in append.c, its
 * idempotency records in idem.c). See batch.h. */
#include <event2/buffer.h>
#include <stdlib.h>

#include "batch.h"

void column_open(struct column *c)
{
	c->buf = evbuffer_new();
	c->n = 0;
	c->ok = c->buf && evbuffer_add(c->buf, "{", 1) == 0;
}

void column_add(struct column *c, const char *value)
{
	if (c->ok)
		pg_array_append(c->buf, value, c->n++ == 0);
}

char *column_take(struct column *c)
{
	char *out = NULL;
	size_t len;

	if (c->ok && evbuffer_add(c->buf, "}", 2) == 0) { /* with the NUL */
		len = evbuffer_get_length(c->buf);
		out = malloc(len);
		if (out)
			evbuffer_remove(c->buf, out, len);
	}
	if (c->buf)
		evbuffer_free(c->buf);
	c->buf = NULL;
	return out;
}

bool queue_columns(struct pg *pg, const char *statement, int n, struct column *cols)
{
	char *v[APPEND_MAX_COLUMNS] = { NULL };
	bool ok = false;

	if (n > APPEND_MAX_COLUMNS)
		return false;
	for (int i = 0; i < n; i++)
		v[i] = column_take(&cols[i]);
	for (int i = 0; i < n; i++)
		if (!v[i])
			goto done;
	ok = pg_queue(pg, statement, n, (const char *const *)v);
done:
	for (int i = 0; i < n; i++)
		free(v[i]);
	return ok;
}
