/* Checks of the event store itself that every process makes before trusting it. */
#include "eventstore.h"

#include <stdio.h>
#include <string.h>

/* The newest txid by the (txid, position) index, and the cluster's next txid
 * (pg_snapshot_xmax: assigns none). No row: an empty log. */
static const char txid_check_sql[] =
	"SELECT e.txid::text, pg_snapshot_xmax(pg_current_snapshot())::text, "
	"e.txid >= pg_snapshot_xmax(pg_current_snapshot()) "
	"FROM (SELECT txid FROM events ORDER BY txid DESC LIMIT 1) e";

enum eventstore_check eventstore_check_txids(PGconn *conn, char *msg, size_t len)
{
	PGresult *r = PQexecParams(conn, txid_check_sql, 0, NULL, NULL, NULL, NULL, 0);
	enum eventstore_check out = EVENTSTORE_OK;

	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		snprintf(msg, len, "cannot check the event store's txids: %s",
			 PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY)
				 ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY)
				 : PQerrorMessage(conn));
		out = EVENTSTORE_UNCHECKED;
		goto done;
	}
	if (PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 2), "t") == 0) {
		snprintf(msg, len,
			 "the event store holds txid %s but this PostgreSQL cluster's next "
			 "transaction is %s: was the database restored from a logical dump "
			 "(pg_dump) into another cluster? Readers would skip every new event. "
			 "Restore as docs/operations.md (\"Backup and restore\") says: advance the "
			 "cluster's xid epoch with pg_resetwal first",
			 PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1));
		out = EVENTSTORE_TXIDS_AHEAD;
	}
done:
	PQclear(r);
	return out;
}

enum eventstore_check eventstore_check_txids_at(const char *conninfo, char *msg, size_t len)
{
	/* Later keywords override what the expanded conninfo says. */
	const char *const keys[] = { "dbname", "connect_timeout", NULL };
	const char *const values[] = { conninfo, "5", NULL };
	PGconn *conn = PQconnectdbParams(keys, values, 1);
	enum eventstore_check out;

	if (PQstatus(conn) != CONNECTION_OK) {
		snprintf(msg, len, "cannot check the event store's txids: %s",
			 PQerrorMessage(conn));
		msg[strcspn(msg, "\n")] = '\0';
		PQfinish(conn);
		return EVENTSTORE_UNCHECKED;
	}
	out = eventstore_check_txids(conn, msg, len);
	PQfinish(conn);
	return out;
}
