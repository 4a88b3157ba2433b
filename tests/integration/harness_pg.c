/* Integration-test harness: PostgreSQL: a fresh migrated database per test and
 * blocking SQL helpers. */
#include "harness.h"
#include "harness_internal.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void harness_conninfo(const char *db, const char *role, char *out, size_t len)
{
	PQconninfoOption *opts = PQconninfoParse(harness_env("DAYBOOK_TEST_PG"), NULL);
	const char *host = "127.0.0.1", *port = "5432", *user = "postgres";

	cr_assert(opts, "DAYBOOK_TEST_PG does not parse");
	for (PQconninfoOption *o = opts; o->keyword; o++) {
		if (!o->val)
			continue;
		if (strcmp(o->keyword, "host") == 0)
			host = o->val;
		else if (strcmp(o->keyword, "port") == 0)
			port = o->val;
		else if (strcmp(o->keyword, "user") == 0)
			user = o->val;
	}
	snprintf(out, len, "host=%s port=%s dbname=%s user=%s connect_timeout=5", host, port, db,
		 role ? role : user);
	PQconninfoFree(opts);
}

static PGconn *connect_db(const char *db)
{
	char conninfo[512];
	PGconn *conn;

	harness_conninfo(db, NULL, conninfo, sizeof(conninfo));
	conn = PQconnectdb(conninfo);
	cr_assert(PQstatus(conn) == CONNECTION_OK, "connecting to %s: %s", db,
		  PQerrorMessage(conn));
	return conn;
}

PGresult *sql(const char *db, const char *query)
{
	PGconn *conn = connect_db(db);
	PGresult *r = PQexec(conn, query);
	ExecStatusType st = PQresultStatus(r);

	cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "SQL failed: %s\n%s", query,
		  PQresultErrorMessage(r));
	PQfinish(conn);
	return r;
}

PGconn *harness_connect_as(const char *db, const char *role)
{
	char conninfo[512];
	PGconn *conn;

	harness_conninfo(db, role, conninfo, sizeof(conninfo));
	conn = PQconnectdb(conninfo);
	cr_assert(PQstatus(conn) == CONNECTION_OK, "connecting as %s: %s",
		  role ? role : "superuser", PQerrorMessage(conn));
	return conn;
}

const char *harness_sqlstate(PGconn *conn, const char *query, char code[6])
{
	PGresult *r = PQexec(conn, query);
	ExecStatusType st = PQresultStatus(r);
	const char *c = PQresultErrorField(r, PG_DIAG_SQLSTATE);

	snprintf(code, 6, "%s",
		 st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK ? ""
		 : c                                             ? c
								 : "?????");
	PQclear(r);
	return code;
}

long long sql_int(const char *db, const char *query)
{
	PGresult *r = sql(db, query);
	long long v;

	cr_assert(PQntuples(r) == 1, "expected one row from: %s", query);
	v = PQgetisnull(r, 0, 0) ? 0 : atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

void harness_db_create(char *db, size_t len)
{
	static int counter;
	char cmd[1024];
	PGconn *conn;
	PGresult *r;

	snprintf(db, len, "t_%d_%d_%ld", (int)getpid(), counter++,
		 (long)(harness_now() * 1000) % 100000);
	conn = PQconnectdb(harness_env("DAYBOOK_TEST_PG"));
	cr_assert(PQstatus(conn) == CONNECTION_OK, "connecting to DAYBOOK_TEST_PG: %s",
		  PQerrorMessage(conn));
	snprintf(cmd, sizeof(cmd), "CREATE DATABASE %s", db);
	r = PQexec(conn, cmd);
	cr_assert(PQresultStatus(r) == PGRES_COMMAND_OK, "%s: %s", cmd, PQresultErrorMessage(r));
	PQclear(r);
	PQfinish(conn);
	harness_migrate(db);
}

void harness_migrate(const char *db)
{
	char *out;
	int status = harness_admin(db, NULL, (const char *const[]){ "migrate", NULL }, &out);

	cr_assert_eq(status, 0, "migrating %s failed (%d):\n%s", db, status, out);
	free(out);
}

void harness_print_xid_holders(void)
{
	PGconn *conn = PQconnectdb(harness_env("DAYBOOK_TEST_PG"));
	PGresult *r = PQexec(conn,
			     "SELECT pid, datname, backend_xid, now() - xact_start, state, "
			     "left(query, 100) FROM pg_stat_activity WHERE backend_xid IS NOT "
			     "NULL ORDER BY xact_start");

	fprintf(stderr, "---- transactions holding an xid (xmin %s) ----\n",
		PQresultStatus(r) == PGRES_TUPLES_OK ? "below" : PQresultErrorMessage(r));
	for (int i = 0; PQresultStatus(r) == PGRES_TUPLES_OK && i < PQntuples(r); i++)
		fprintf(stderr, "%s %s xid %s for %s, %s: %s\n", PQgetvalue(r, i, 0),
			PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 3),
			PQgetvalue(r, i, 4), PQgetvalue(r, i, 5));
	PQclear(r);
	PQfinish(conn);
}
