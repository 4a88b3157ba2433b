/* Leadership by a lease in PostgreSQL, with fencing: one instance of a service leads
 * and writes, the others stand by. Used by daybook-projector (sql/010, one lease per
 * projection) and daybook-command (sql/012, one lease for the write side).
 *
 * The lease is claimed and renewed every LEASE_RENEW_S on a connection of its own, so
 * that no long write delays a renewal. The claim is a server-side function taking
 * ($1 name, $2 holder, $3 epoch held or 0, $4 seconds, $5 writer pid or 0) and
 * returning the epoch now held, or 0 when another process holds the lease; it raises
 * the epoch on every takeover and ends the previous holder's writing session. Every
 * write of the holder carries its epoch and is checked in the write's own transaction
 * (the service's fence), so a deposed holder's writes fail. */
#ifndef DAYBOOK_LEASE_H
#define DAYBOOK_LEASE_H

#include <stdbool.h>

#include "log.h"

struct event_base;

#define LEASE_SECONDS 5.0 /* a frozen leader is replaced this long after its last renewal */
#define LEASE_RENEW_S 1   /* the holder renews, and standbys try, this often */

struct lease;
struct lease_config {
	const char *conninfo;
	const char *name;             /* the lease row, the claim's $1 */
	const char *claim_sql;        /* the claim statement (see above) */
	const char *application_name; /* of the lease's PostgreSQL session */
	const char *who;              /* for messages: "projector", "command instance" */
	struct event_base *base;
	const struct log *log;
	/* The backend pid of the caller's writing session (0: none): a successor ends it. */
	int (*writer_pid)(void *arg);
	/* A new term began (epoch > 0), or the lease was lost (epoch 0; why says how). */
	void (*on_change)(void *arg, long long epoch, const char *why);
	void *arg;
};
/* Start claiming at once; the config's pointers must outlive the lease. */
int lease_open(struct lease **out, const struct lease_config *cfg)
	__attribute__((warn_unused_result));
void lease_close(struct lease **l);
/* The caller found its epoch stale (a fenced write): stand down now, as if a renewal
 * had failed; on_change is not called. */
void lease_lost(struct lease *l);
/* The epoch held, 0 when none. A term whose last renewal is older than the lease (the
 * process was frozen, or cut off) ends here and now, with on_change(0), before the
 * caller writes anything: the timer that would notice may not have run yet. */
long long lease_epoch(struct lease *l);

#endif
