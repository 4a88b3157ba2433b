/* Leadership by a lease in PostgreSQL (lease.h): claims and renews a lease row and
 * reports each new term, or its loss, to the caller. */
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "lease.h"
#include "pg.h"

struct lease {
	struct lease_config cfg;
	struct pg_statement statement; /* the claim */
	struct pg *pg;
	struct event *timer;
	char holder[160];   /* this process, as the lease row names it */
	long long epoch;    /* the epoch held, 0 when none */
	double sent;        /* monotonic time the claim in flight was sent */
	double valid_until; /* monotonic: the lease is surely ours until then */
	bool claiming;
	bool answered; /* a claim has been answered since we started */
	bool warned;   /* a failed claim was logged; quiet until one succeeds */
};

static void lose(struct lease *l, const char *why)
{
	if (l->epoch == 0)
		return;
	l->epoch = 0;
	l->cfg.on_change(l->cfg.arg, 0, why);
}

void lease_lost(struct lease *l)
{
	l->epoch = 0;
}

long long lease_epoch(struct lease *l)
{
	if (l->epoch && mono_now() >= l->valid_until)
		lose(l, "the lease was not renewed in time");
	return l->epoch;
}

static void claim_done(void *arg, const struct pg_outcome *out)
{
	struct lease *l = arg;
	PGresult *const *results = out->results;
	size_t n = out->n;
	/* Every status but DONE is a failure: a claim refused at COMMIT did not happen. */
	const char *error = out->status == PG_RUN_DONE ? NULL : out->error;
	long long got;

	l->claiming = false;
	if (error || n != 1 || PQresultStatus(results[0]) != PGRES_TUPLES_OK ||
	    PQntuples(results[0]) != 1) {
		/* Not an answer: the lease may still be ours until valid_until. */
		if (!l->warned && !error && n == 1)
			log_warn(l->cfg.log, "claiming the %s lease failed: %s", l->cfg.name,
				 PQresultErrorMessage(results[0]));
		l->warned = true;
		return;
	}
	l->warned = false;
	got = strtoll(PQgetvalue(results[0], 0, 0), NULL, 10);
	if (got == 0) {
		/* Reported when a term ends, and once at the start so the caller stands by. */
		if (l->epoch || !l->answered) {
			l->epoch = 0;
			char why[96];
			snprintf(why, sizeof(why), "another %s %s the lease", l->cfg.who,
				 l->answered ? "took" : "holds");
			l->cfg.on_change(l->cfg.arg, 0, why);
		}
		l->answered = true;
		return;
	}
	l->answered = true;
	/* The server set the expiry from its clock when it ran the claim, after we sent it. */
	l->valid_until = l->sent + LEASE_SECONDS;
	if (got != l->epoch) {
		l->epoch = got;
		l->cfg.on_change(l->cfg.arg, got, NULL);
	}
}

static void claim(struct lease *l)
{
	char epoch[24], secs[16], writer[16];
	const char *params[5] = { l->cfg.name, l->holder, epoch, secs, writer };

	if (l->claiming || !pg_ready(l->pg))
		return;
	snprintf(epoch, sizeof(epoch), "%lld", l->epoch);
	snprintf(secs, sizeof(secs), "%.1f", LEASE_SECONDS);
	snprintf(writer, sizeof(writer), "%d", l->cfg.writer_pid(l->cfg.arg));
	if (!pg_queue(l->pg, "claim", 5, params) || !pg_run(l->pg, claim_done, l))
		return; /* the connection is being reset: on_connect claims again */
	l->sent = mono_now();
	l->claiming = true;
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct lease *l = arg;

	(void)fd;
	(void)what;
	/* Unrenewed for a whole lease: a standby may lead by now. The fence makes our
	 * writes fail anyway; stepping down says so and stops trying. */
	if (l->epoch && mono_now() >= l->valid_until)
		lose(l, "the lease was not renewed in time");
	claim(l);
}

static void on_connect(void *arg)
{
	struct lease *l = arg;

	l->claiming = false;
	claim(l);
}

int lease_open(struct lease **out, const struct lease_config *cfg)
{
	struct lease *l = calloc(1, sizeof(*l));
	char host[64] = "";
	struct timespec ts;
	struct timeval every = { LEASE_RENEW_S, 0 };
	struct pg_config pgc = {
		.conninfo = cfg->conninfo,
		.application_name = cfg->application_name,
		.base = cfg->base,
		.log = cfg->log,
		.nstatements = 1,
		/* A claim slower than the lease is worthless: connect again. */
		.run_timeout = LEASE_SECONDS,
		.on_connect = on_connect,
	};

	*out = NULL;
	if (!l)
		return -1;
	l->cfg = *cfg;
	l->statement.name = "claim";
	l->statement.sql = cfg->claim_sql;
	pgc.statements = &l->statement;
	pgc.arg = l;
	/* Unique per process and per start, also across hosts and pid reuse. */
	gethostname(host, sizeof(host) - 1);
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(l->holder, sizeof(l->holder), "%s/%ld/%lld.%09ld", host, (long)getpid(),
		 (long long)ts.tv_sec, ts.tv_nsec);
	l->timer = event_new(cfg->base, -1, EV_PERSIST, on_timer, l);
	if (!l->timer || pg_open(&l->pg, &pgc)) {
		lease_close(&l);
		return -1;
	}
	evtimer_add(l->timer, &every);
	*out = l;
	return 0;
}

void lease_close(struct lease **lp)
{
	struct lease *l = *lp;

	if (!l)
		return;
	if (l->timer)
		event_free(l->timer);
	pg_close(&l->pg);
	free(l);
	*lp = NULL;
}
