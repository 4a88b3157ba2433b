/* Checks of the event store itself that every process makes before trusting it. */
#ifndef DAYBOOK_EVENTSTORE_H
#define DAYBOOK_EVENTSTORE_H

#include <libpq-fe.h>
#include <stddef.h>

/* The exit status of a process that refuses an event store it cannot read in order
 * (2 is a bad setting). */
#define EVENTSTORE_EXIT_UNUSABLE 3

enum eventstore_check {
	EVENTSTORE_OK,
	EVENTSTORE_TXIDS_AHEAD, /* the log holds txids this cluster has not reached */
	EVENTSTORE_UNCHECKED,   /* no answer (not reachable, not migrated): go on */
};

/* Readers follow the log in (txid, position) order below pg_snapshot_xmin. A logical
 * dump restored into another cluster keeps its txids; when they are at or above the
 * new cluster's next transaction id, every new event sorts before them and readers
 * skip it. Checks the newest txid of the log (one index probe) against the cluster's
 * next one on `conn`. On EVENTSTORE_TXIDS_AHEAD, `msg` holds one line naming the
 * problem and pointing at docs/operations.md; on EVENTSTORE_UNCHECKED, why. */
enum eventstore_check eventstore_check_txids(PGconn *conn, char *msg, size_t len);

/* The same on a new connection of its own (connect timeout 5 s), closed before it
 * returns: for a process's start, before its event loop runs. */
enum eventstore_check eventstore_check_txids_at(const char *conninfo, char *msg, size_t len);

#endif
