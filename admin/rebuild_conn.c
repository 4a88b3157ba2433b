/* daybook-admin rebuild: PostgreSQL helpers every room uses (a statement, waiting for a
 * sent query's answer, collecting its results) and the interrupt flag; the bottom room. */
#include <errno.h>
#include <libpq-fe.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>

#include "rebuild.h"

/* The one piece of process-wide state: set by the signal handler, read by the loop. */
volatile sig_atomic_t rb_interrupted;

bool rb_exec(struct rebuild *rb, PGconn *pg, const char *sql)
{
	PGresult *r = PQexec(pg, sql);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;

	if (!ok)
		rb_error(rb, "%s: %s", sql, PQresultErrorMessage(r));
	PQclear(r);
	return ok;
}

/* Wait until pg's pending query has its answer. Ctrl-C or SIGTERM, or a failure
 * elsewhere (abort), cancels it: a key build or a count over a large log can take
 * minutes, and the caller then fails and removes the shadow. */
void rb_await_answer(struct rebuild *rb, PGconn *pg, bool abort)
{
	bool cancelled = false;

	while (PQisBusy(pg)) {
		struct pollfd p = { .fd = PQsocket(pg), .events = POLLIN };
		if ((rb_interrupted || abort) && !cancelled) {
			PGcancel *c = PQgetCancel(pg);
			char err[256];
			if (c && !PQcancel(c, err, sizeof(err)))
				rb_error(rb, "cancelling: %s\n", err);
			PQfreeCancel(c);
			cancelled = true;
		}
		if ((poll(&p, 1, 100) < 0 && errno != EINTR) || !PQconsumeInput(pg))
			return; /* PQgetResult reports the broken connection */
	}
}

/* Collect the results of a query sent on pg; false (printed) if any failed. With
 * abort, the query is cancelled: its outcome no longer matters. */
bool rb_sent_ok(struct rebuild *rb, PGconn *pg, const char *what, bool abort)
{
	PGresult *r;
	bool ok = true;

	while (rb_await_answer(rb, pg, abort), (r = PQgetResult(pg))) {
		bool failed = PQresultStatus(r) != PGRES_TUPLES_OK &&
			      PQresultStatus(r) != PGRES_COMMAND_OK;
		if (failed && !abort) /* when aborting, the failure that led here is said */
			rb_error(rb, "%s: %s", what, PQresultErrorMessage(r));
		if (failed)
			ok = false;
		PQclear(r);
	}
	return ok && !abort;
}
