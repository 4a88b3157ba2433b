/* daybook-admin verify: reading PostgreSQL through server-side cursors. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "verify.h"

bool verify_exec(struct verify *v, const char *sql)
{
	PGresult *r = PQexec(v->pg, sql);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;

	if (!ok)
		verify_fail(v, "%s: %s", sql, PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* DECLARE the cursor; `snapshot` passes the checkpoint as $1, $2. */
bool cursor_open(struct cursor *c, struct verify *v, const char *name, const char *query,
		 bool snapshot)
{
	const char *params[2] = { v->cp_txid, v->cp_pos };
	char *sql = malloc(strlen(query) + 64);
	PGresult *r;

	*c = (struct cursor){ .v = v, .name = name };
	if (!sql) {
		verify_fail(v, "out of memory\n");
		return false;
	}
	sprintf(sql, "DECLARE %s NO SCROLL CURSOR FOR %s", name, query);
	r = PQexecParams(v->pg, sql, snapshot ? 2 : 0, NULL, snapshot ? params : NULL, NULL, NULL,
			 0);
	free(sql);
	if (PQresultStatus(r) != PGRES_COMMAND_OK) {
		verify_fail(v, "opening cursor %s: %s", name, PQresultErrorMessage(r));
		c->end = true;
	}
	PQclear(r);
	return !v->failed;
}

static bool cursor_fetch(struct cursor *c)
{
	char q[96];

	PQclear(c->res);
	c->res = NULL;
	c->row = 0;
	if (c->end)
		return false;
	snprintf(q, sizeof(q), "FETCH FORWARD %d FROM %s", FETCH_ROWS, c->name);
	c->res = PQexec(c->v->pg, q);
	if (PQresultStatus(c->res) != PGRES_TUPLES_OK) {
		verify_fail(c->v, "reading cursor %s: %s", c->name, PQresultErrorMessage(c->res));
		PQclear(c->res);
		c->res = NULL;
		c->end = true;
		return false;
	}
	c->end = PQntuples(c->res) < FETCH_ROWS;
	return PQntuples(c->res) > 0;
}

/* Is there a current row? Fetches the next rows when needed. */
static bool cursor_has(struct cursor *c)
{
	if (c->res && c->row < PQntuples(c->res))
		return true;
	return !c->v->failed && cursor_fetch(c);
}

void cursor_next(struct cursor *c)
{
	c->row++;
}

/* A column of the current row; NULL for SQL NULL. */
const char *cursor_col(const struct cursor *c, int column)
{
	return PQgetisnull(c->res, c->row, column) ? NULL : PQgetvalue(c->res, c->row, column);
}

/* The key column of the current row, or NULL at the end. */
const char *cursor_head(struct cursor *c)
{
	return cursor_has(c) ? PQgetvalue(c->res, c->row, 0) : NULL;
}

void cursor_close(struct cursor *c)
{
	char q[64];

	PQclear(c->res);
	c->res = NULL;
	snprintf(q, sizeof(q), "CLOSE %s", c->name);
	if (!c->v->failed)
		verify_exec(c->v, q);
}

/* A second session, in autocommit: what the projector wrote to Redis after verify's
 * snapshot is checked against the log as it is now (the snapshot cannot see it). */
PGresult *verify_now(struct verify *v, const char *query, int nparams, const char *const *params)
{
	PGresult *r;

	if (!v->now) {
		v->now = PQconnectdb(v->conninfo);
		if (PQstatus(v->now) != CONNECTION_OK) {
			verify_fail(v, "connecting to PostgreSQL: %s", PQerrorMessage(v->now));
			return NULL;
		}
		PQclear(PQexec(v->now, "SET application_name = 'daybook-admin verify'"));
	}
	r = PQexecParams(v->now, query, nparams, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(r) == PGRES_TUPLES_OK)
		return r;
	verify_fail(v, "reading the log: %s", PQresultErrorMessage(r));
	PQclear(r);
	return NULL;
}

bool verify_event_in_log(struct verify *v, const char *token)
{
	struct readmodel_position p;
	char txid[24], pos[24];
	const char *params[2] = { txid, pos };
	PGresult *r;
	bool found;

	if (!readmodel_position_parse(token, &p))
		return false;
	snprintf(txid, sizeof(txid), "%llu", (unsigned long long)p.txid);
	snprintf(pos, sizeof(pos), "%llu", (unsigned long long)p.position);
	r = verify_now(v, READMODEL_EVENT_AT_SQL, 2, params);
	found = r && PQntuples(r) == 1;
	PQclear(r);
	return found;
}
