/* PostgreSQL on the event loop: one non-blocking libpq connection in pipeline mode,
 * reconnecting by itself, plus small helpers shared with the blocking admin tool. */
#include "pg.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pg_internal.h"

#define BACKOFF_MIN 0.05
#define BACKOFF_MAX 2.0
#define CONNECT_TIMEOUT 5.0
/* With several hosts, each gets its own deadline (libpq ignores connect_timeout in
 * non-blocking connects): the string's connect_timeout, else this. Half the single
 * host's, so that a primary and its standby (Patroni's pair) are both tried within the
 * time one attempt took before; far above a healthy connection's few milliseconds. */
#define HOST_CONNECT_TIMEOUT (CONNECT_TIMEOUT / 2)
#define CANCEL_TIMEOUT 2.0 /* seconds to wait for a cancel request to be delivered */

enum pg_state {
	PG_DOWN,       /* waiting to reconnect */
	PG_CONNECTING, /* PQconnectPoll in progress */
	PG_SETUP,      /* running the setup pipeline (SET, PREPARE, LISTEN) */
	PG_IDLE,       /* ready for a run */
	PG_RUNNING,    /* a run awaits its results */
	PG_CANCELLING, /* a run timed out: its cancel request is on its way */
};

struct pg {
	struct pg_config cfg;
	PGconn *conn;
	enum pg_state state;
	struct event *io;    /* socket readiness */
	struct event *timer; /* reconnect backoff, connect and run timeouts */
	double backoff;
	bool want_write;
	/* The current run: one result slot per queued statement, grown on demand (a
	 * caller may queue any number of statements). */
	PGresult **results;
	size_t cap, queued, current;
	bool current_has_result;
	PGresult *commit_error; /* a result after every statement's: COMMIT failed */
	bool sync_sent;         /* the run's sync has left our output buffer */
	pg_done_cb done;
	void *done_arg;
	/* A timed-out run's cancel request, sent from a thread (below). */
	int cancel_fd;
	struct event *cancel_ev;
	/* A connection string that names several hosts (NULL: one host, or a string left
	 * to libpq as it is). An attempt lists them from host `first` on; a host that does
	 * not answer within host_timeout is moved last and the next attempt starts at once,
	 * until every host of the round (round_left more) has had its turn. */
	struct pg_hosts *hosts;
	double host_timeout;
	size_t first, round_left;
	size_t at;     /* the position in this attempt's list of the host libpq is on */
	char addr[64]; /* and the address it tries (an IP address is at most 45 chars) */
	char error[256];
};

static void on_io(evutil_socket_t fd, short what, void *arg);
static void start_connect(struct pg *pg);
static void stop_cancel_wait(struct pg *pg);

static struct timeval tv_of(double secs)
{
	struct timeval tv = { (time_t)secs, (suseconds_t)((secs - (double)(time_t)secs) * 1e6) };
	return tv;
}

static void arm_timer(struct pg *pg, double secs)
{
	struct timeval tv = tv_of(secs);
	evtimer_add(pg->timer, &tv);
}

/* (Re)register the socket event for reading, plus writing when output is pending. */
static void watch(struct pg *pg, bool read, bool write)
{
	short what = EV_PERSIST | (read ? EV_READ : 0) | (write ? EV_WRITE : 0);

	event_del(pg->io);
	event_assign(pg->io, pg->cfg.base, PQsocket(pg->conn), what, on_io, pg);
	event_add(pg->io, NULL);
	pg->want_write = write;
}

static void clear_results(struct pg *pg)
{
	for (size_t i = 0; i < pg->queued; i++) {
		PQclear(pg->results[i]);
		pg->results[i] = NULL;
	}
	PQclear(pg->commit_error);
	pg->commit_error = NULL;
	pg->queued = pg->current = 0;
	pg->current_has_result = false;
}

/* Hand the run's outcome to its callback, then free the results. The connection is
 * idle (or down) before the callback runs, so the callback may start the next run at
 * once. `error` is non-NULL when the connection was lost or the run timed out. */
static void complete_run(struct pg *pg, const char *error)
{
	pg_done_cb done = pg->done;
	void *arg = pg->done_arg;
	struct pg_outcome out = { .status = PG_RUN_DONE };
	size_t n = pg->queued;
	PGresult **results = pg->results;
	PGresult *commit_error = pg->commit_error;
	char why[512];

	/* The callback may queue the next run into fresh slots. */
	pg->results = NULL;
	pg->cap = pg->queued = pg->current = 0;
	pg->current_has_result = false;
	pg->commit_error = NULL;
	pg->done = NULL;
	if (error) {
		out.status = pg->sync_sent ? PG_RUN_UNKNOWN : PG_RUN_NOT_SENT;
		out.error = error;
	} else {
		evtimer_del(pg->timer);
		pg->state = PG_IDLE;
		out.results = results;
		out.n = n;
		if (commit_error) {
			snprintf(why, sizeof(why), "the transaction failed at commit: %s",
				 PQresultErrorMessage(commit_error));
			why[strcspn(why, "\n")] = '\0';
			out.status = PG_RUN_COMMIT_FAILED;
			out.commit_error = commit_error;
			out.error = why;
		}
	}
	pg->sync_sent = false;
	if (done)
		done(arg, &out);
	for (size_t i = 0; i < n; i++)
		PQclear(results[i]);
	free(results);
	PQclear(commit_error);
}

bool pg_outcome_ok(const struct pg_outcome *out, char *why, size_t whylen)
{
	if (out->status != PG_RUN_DONE) {
		snprintf(why, whylen, "%s", out->error ? out->error : "the run failed");
		return false;
	}
	for (size_t i = 0; i < out->n; i++) {
		ExecStatusType st = PQresultStatus(out->results[i]);
		if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
			snprintf(why, whylen, "%s",
				 out->results[i] ? PQresultErrorMessage(out->results[i])
						 : "no result");
			why[strcspn(why, "\n")] = '\0';
			return false;
		}
	}
	return true;
}

const char *pg_outcome_value(const struct pg_outcome *out)
{
	PGresult *r = out->status == PG_RUN_DONE && out->n == 1 ? out->results[0] : NULL;

	if (!r || PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 || PQgetisnull(r, 0, 0))
		return NULL;
	return PQgetvalue(r, 0, 0);
}

static void lose_connection(struct pg *pg, const char *why)
{
	bool was_up = pg->state >= PG_SETUP;

	snprintf(pg->error, sizeof(pg->error), "%s", why);
	for (char *p = pg->error; *p; p++)
		if (*p == '\n')
			*p = ' ';
	if (was_up || pg->backoff >= BACKOFF_MAX)
		log_warn(pg->cfg.log, "postgresql connection lost: %s", pg->error);
	event_del(pg->io);
	evtimer_del(pg->timer);
	stop_cancel_wait(pg);
	if (pg->conn) {
		/* PQfinish flushes what libpq still buffers before its goodbye: if that is
		 * a run's sync, the run could commit after all. Shut our sending side first
		 * so that nothing more leaves; PostgreSQL then sees the end of the stream
		 * before any sync and rolls the transaction back. */
		if (pg->done && !pg->sync_sent)
			shutdown(PQsocket(pg->conn), SHUT_WR);
		PQfinish(pg->conn);
		pg->conn = NULL;
	}
	pg->state = PG_DOWN;
	if (pg->done)
		complete_run(pg, pg->error);
	else
		clear_results(pg);
	arm_timer(pg, pg->backoff);
	pg->backoff = pg->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : pg->backoff * 2;
}

static void flush(struct pg *pg)
{
	int rc = PQflush(pg->conn);

	if (rc < 0) {
		lose_connection(pg, PQerrorMessage(pg->conn));
		return;
	}
	/* Once the whole output (the sync last) has left, PostgreSQL may commit the run:
	 * before that it cannot, whatever happens to the connection. */
	if (rc == 0 && pg->done)
		pg->sync_sent = true;
	if ((rc == 1) != pg->want_write)
		watch(pg, true, rc == 1);
}

static void setup_done(void *arg, const struct pg_outcome *out)
{
	struct pg *pg = arg;
	char why[512];

	if (out->status == PG_RUN_NOT_SENT || out->status == PG_RUN_UNKNOWN)
		return;
	if (!pg_outcome_ok(out, why, sizeof(why))) {
		log_error(pg->cfg.log, "postgresql setup failed: %s", why);
		/* Treat like a lost connection: retry with backoff. */
		pg->state = PG_SETUP;
		lose_connection(pg, why);
		return;
	}
	pg->backoff = BACKOFF_MIN;
	pg->error[0] = '\0';
	log_info(pg->cfg.log, "postgresql connected to %s:%s", PQhost(pg->conn), PQport(pg->conn));
	if (pg->cfg.on_connect)
		pg->cfg.on_connect(pg->cfg.arg);
}

static bool reserve_slot(struct pg *pg);

/* Queue the session's server-side deadlines, so that PostgreSQL gives up before the
 * client does: each statement, a transaction left idle by a stalled client, and (from
 * PostgreSQL 17, which has it) the whole transaction end at statement_timeout_ms. On
 * older servers the whole run is bounded by run_timeout and its cancel. */
static bool queue_deadlines(struct pg *pg)
{
	char ms[24];
	const char *v[1] = { ms };

	if (pg->cfg.statement_timeout_ms <= 0)
		return true;
	snprintf(ms, sizeof(ms), "%d", pg->cfg.statement_timeout_ms);
	if (!pg_queue_sql(pg,
			  "SELECT set_config('statement_timeout', $1, false), "
			  "set_config('idle_in_transaction_session_timeout', $1, false)",
			  1, v))
		return false;
	if (PQserverVersion(pg->conn) >= 170000)
		return pg_queue_sql(pg, "SELECT set_config('transaction_timeout', $1, false)", 1,
				    v);
	return true;
}

static bool begin_setup(struct pg *pg)
{
	char sql[128];

	if (PQsetnonblocking(pg->conn, 1) != 0 || PQenterPipelineMode(pg->conn) != 1)
		return false;
	pg->state = PG_IDLE;
	/* Durability is part of the contract whatever the server's default. */
	if (!pg_queue_sql(pg,
			  pg->cfg.async_commit ? "SET synchronous_commit = off"
					       : "SET synchronous_commit = on",
			  0, NULL))
		return false;
	if (!queue_deadlines(pg))
		return false;
	/* No JIT compilation: every statement of a service is short and run again and
	 * again, and compiling one costs far more than it can save. A statement whose
	 * custom plan guessed a long stream's rows (time travel over an account of
	 * 1,000,000 events: an estimate of 484 million rows) went over jit_above_cost and
	 * took 450-570 ms instead of 2 (docs/performance.md, "Time travel"). */
	if (!pg_queue_sql(pg, "SET jit = off", 0, NULL))
		return false;
	if (pg->cfg.generic_plans &&
	    !pg_queue_sql(pg, "SET plan_cache_mode = force_generic_plan", 0, NULL))
		return false;
	for (size_t i = 0; i < pg->cfg.nstatements; i++) {
		const struct pg_statement *s = &pg->cfg.statements[i];
		if (!reserve_slot(pg) || !PQsendPrepare(pg->conn, s->name, s->sql, 0, NULL))
			return false;
		pg->results[pg->queued++] = NULL;
	}
	if (pg->cfg.listen_channel) {
		snprintf(sql, sizeof(sql), "LISTEN %s", pg->cfg.listen_channel);
		if (!pg_queue_sql(pg, sql, 0, NULL))
			return false;
	}
	if (!pg_run(pg, setup_done, pg))
		return false;
	pg->state = PG_SETUP;
	return true;
}

/* Give the host libpq is on its own deadline whenever it moves on to another host (or
 * to another address of one, as libpq's connect_timeout restarts in blocking connects). */
static void note_host(struct pg *pg)
{
	const char *addr = PQhostaddr(pg->conn);
	size_t at;

	if (!pg->hosts)
		return;
	at = pg_hosts_find(pg->hosts, pg->first, pg->at, PQhost(pg->conn), PQport(pg->conn));
	if (at == pg_hosts_count(pg->hosts))
		at = pg->at;
	if (at == pg->at && strncmp(pg->addr, addr, sizeof(pg->addr) - 1) == 0)
		return;
	pg->at = at;
	snprintf(pg->addr, sizeof(pg->addr), "%s", addr);
	arm_timer(pg, pg->host_timeout);
}

static void poll_connect(struct pg *pg)
{
	switch (PQconnectPoll(pg->conn)) {
	case PGRES_POLLING_READING:
		note_host(pg);
		watch(pg, true, false);
		break;
	case PGRES_POLLING_WRITING:
		note_host(pg);
		watch(pg, false, true);
		break;
	case PGRES_POLLING_OK:
		evtimer_del(pg->timer);
		watch(pg, true, false);
		if (!begin_setup(pg))
			lose_connection(pg, PQerrorMessage(pg->conn));
		break;
	default:
		lose_connection(pg, PQerrorMessage(pg->conn));
		break;
	}
}

/* A migration that changes a column's type or collation makes every statement
 * prepared before it that returns the column fail for good ("cached plan must not
 * change result type", SQLSTATE 0A000): the statements must be prepared again, which
 * a new connection does. The message is not matched (it is translated with
 * lc_messages); no other 0A000 comes from these statements in practice, and a
 * needless reconnection costs little. */
static bool stale_plan(const struct pg *pg)
{
	for (size_t i = 0; i < pg->queued; i++)
		if (pg->results[i] && strcmp(pg_sqlstate(pg->results[i]), "0A000") == 0)
			return true;
	return false;
}

/* Collect pipeline results until the sync (or until libpq needs more input). Each
 * statement yields its result and a NULL; a result after every statement's is the
 * verdict of the implicit COMMIT at the sync (its own result, then a NULL). */
static void read_results(struct pg *pg)
{
	bool commit_null = false;

	while (pg->conn && !PQisBusy(pg->conn)) {
		PGresult *r = PQgetResult(pg->conn);
		if (!r) {
			if (pg->current_has_result) {
				pg->current++;
				pg->current_has_result = false;
				continue;
			}
			if (pg->current >= pg->queued && pg->commit_error && !commit_null) {
				commit_null = true; /* the sync follows the commit's error */
				continue;
			}
			break;
		}
		if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
			PQclear(r);
			/* Dropped before the caller hears of it, so that nothing more is sent
			 * on this connection: the run fails as a lost connection would. */
			if (stale_plan(pg))
				lose_connection(pg,
						"a prepared statement's result type changed (a "
						"migration): connecting again to prepare them anew");
			else
				complete_run(pg, NULL);
			break;
		}
		if (pg->current < pg->queued && !pg->current_has_result) {
			pg->results[pg->current] = r;
			pg->current_has_result = true;
		} else if (pg->current >= pg->queued && !pg->commit_error &&
			   PQresultStatus(r) == PGRES_FATAL_ERROR) {
			pg->commit_error = r;
		} else {
			PQclear(r); /* a statement's further results: the first one counts */
		}
	}
}

static void drain_notifies(struct pg *pg)
{
	PGnotify *n;
	bool any = false;

	while ((n = PQnotifies(pg->conn))) {
		PQfreemem(n);
		any = true;
	}
	if (any && pg->cfg.on_notify)
		pg->cfg.on_notify(pg->cfg.arg);
}

static void on_io(evutil_socket_t fd, short what, void *arg)
{
	struct pg *pg = arg;

	(void)fd;
	if (pg->state == PG_CONNECTING) {
		poll_connect(pg);
		return;
	}
	if (what & EV_WRITE) {
		flush(pg);
		if (!pg->conn)
			return;
	}
	if (what & EV_READ) {
		if (!PQconsumeInput(pg->conn)) {
			/* PQconsumeInput first flushes what libpq still buffers: the sync may
			 * have left in this very call, so the outcome is unknown. */
			if (pg->done)
				pg->sync_sent = true;
			lose_connection(pg, PQerrorMessage(pg->conn));
			return;
		}
		/* ...and it may have sent the rest of the run, sync included, without our
		 * knowing: record it before a deadline could take the run for unsent. */
		if (pg->done && !pg->sync_sent && pg->want_write) {
			flush(pg);
			if (!pg->conn)
				return;
		}
		read_results(pg);
		if (pg->conn)
			drain_notifies(pg);
	}
}

/* --- cancelling a timed-out run ---------------------------------------------------------
 *
 * Dropping the connection alone does not stop a run: a backend waiting for a lock
 * reads nothing until it is through, and would then reach the sync and commit. So the
 * run is cancelled first (the backend gives up the statement, the sync rolls back) and
 * the connection dropped once PostgreSQL has taken the request. libpq 15 offers only
 * the blocking PQcancel (it connects to the server, without a timeout of its own), so
 * it runs on a short-lived detached thread that owns its PGcancel and reports back
 * through a socket pair; the loop never blocks, and gives up waiting after
 * CANCEL_TIMEOUT (the thread then finishes on its own and frees what it owns). */

struct cancel_job {
	PGcancel *cancel;
	int fd; /* the thread's end of the socket pair */
};

static void *cancel_thread(void *arg)
{
	struct cancel_job *job = arg;
	char msg[256] = "";

	if (PQcancel(job->cancel, msg, sizeof(msg)))
		msg[0] = '\0';
	else if (!msg[0])
		snprintf(msg, sizeof(msg), "cancel request failed");
	/* The loop may have stopped listening: never raise SIGPIPE. */
	if (send(job->fd, msg, strlen(msg) + 1, MSG_NOSIGNAL) < 0) {
		/* nobody waits for the answer any more */
	}
	close(job->fd);
	PQfreeCancel(job->cancel);
	free(job);
	return NULL;
}

static void stop_cancel_wait(struct pg *pg)
{
	if (pg->cancel_ev) {
		event_free(pg->cancel_ev);
		pg->cancel_ev = NULL;
	}
	if (pg->cancel_fd >= 0) {
		close(pg->cancel_fd);
		pg->cancel_fd = -1;
	}
}

static void on_cancel_sent(evutil_socket_t fd, short what, void *arg)
{
	struct pg *pg = arg;
	char msg[256] = "";
	ssize_t n = recv(fd, msg, sizeof(msg) - 1, 0);

	(void)what;
	msg[n > 0 ? n : 0] = '\0';
	stop_cancel_wait(pg);
	if (pg->state != PG_CANCELLING)
		return;
	if (msg[0])
		log_warn(pg->cfg.log, "cancelling a timed-out run: %s", msg);
	lose_connection(pg, msg[0] ? "timed out; the cancel request failed"
				   : "timed out; the run was cancelled");
}

/* Start a background cancel of the run in flight; false when it cannot be started. */
static bool spawn_cancel(struct pg *pg)
{
	struct cancel_job *job = calloc(1, sizeof(*job));
	int fds[2] = { -1, -1 };
	pthread_attr_t attr;
	pthread_t thread;
	sigset_t all, old;
	bool ok = false;

	if (!job || !(job->cancel = PQgetCancel(pg->conn)) ||
	    socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
		goto fail;
	job->fd = fds[1];
	pg->cancel_fd = fds[0];
	pg->cancel_ev = event_new(pg->cfg.base, fds[0], EV_READ, on_cancel_sent, pg);
	if (!pg->cancel_ev || event_add(pg->cancel_ev, NULL) != 0 || pthread_attr_init(&attr) != 0)
		goto fail;
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	/* Signals stay with the loop's thread. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	ok = pthread_create(&thread, &attr, cancel_thread, job) == 0;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (ok)
		return true;
fail:
	stop_cancel_wait(pg);
	if (fds[1] >= 0)
		close(fds[1]);
	if (job && job->cancel)
		PQfreeCancel(job->cancel);
	free(job);
	return false;
}

/* A run outlived run_timeout: cancel it, then drop the connection (on_cancel_sent). */
static void start_cancel(struct pg *pg)
{
	log_warn(pg->cfg.log, "a run took longer than %.1f s: cancelling it", pg->cfg.run_timeout);
	if (!pg->sync_sent || !spawn_cancel(pg)) {
		lose_connection(pg, "timed out waiting for results");
		return;
	}
	/* Nothing more is read from the connection: the outcome is reported as unknown
	 * even if the run's answer comes meanwhile, and the connection is dropped. */
	event_del(pg->io);
	pg->state = PG_CANCELLING;
	arm_timer(pg, CANCEL_TIMEOUT);
}

static void connect_attempt(struct pg *pg);

/* The host libpq is on did not answer in time. With several hosts, the attempt is
 * dropped and the next one starts at once at the host after it (which goes last), until
 * every host of the round has had its turn: only then is the connection lost, and the
 * backoff applies as after any failed attempt. */
static void connect_timed_out(struct pg *pg)
{
	char why[512];
	bool more;

	snprintf(why, sizeof(why), "timed out connecting to %s:%s", PQhost(pg->conn),
		 PQport(pg->conn));
	if (!pg->hosts) {
		lose_connection(pg, why);
		return;
	}
	more = pg->at + 1 < pg->round_left;
	pg->round_left = more ? pg->round_left - pg->at - 1 : 0;
	pg->first = (pg->first + pg->at + 1) % pg_hosts_count(pg->hosts);
	if (!more) {
		lose_connection(pg, why);
		return;
	}
	log_warn(pg->cfg.log, "postgresql %s:%s did not answer within %.1f s: trying the next host",
		 PQhost(pg->conn), PQport(pg->conn), pg->host_timeout);
	event_del(pg->io);
	PQfinish(pg->conn);
	pg->conn = NULL;
	connect_attempt(pg);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct pg *pg = arg;

	(void)fd;
	(void)what;
	switch (pg->state) {
	case PG_DOWN:
		start_connect(pg);
		break;
	case PG_CONNECTING:
		connect_timed_out(pg);
		break;
	case PG_SETUP:
		lose_connection(pg, "timed out waiting for results");
		break;
	case PG_RUNNING:
		start_cancel(pg);
		break;
	case PG_CANCELLING:
		lose_connection(pg, "timed out; the cancel request was not confirmed in time");
		break;
	case PG_IDLE:
		break;
	}
}

static void connect_attempt(struct pg *pg)
{
	/* Our defaults, then dbname: the configured string, which expand_dbname reads as a
	 * connection string that overrides them rather than the other way round. A list of
	 * hosts is the string's settings one by one instead, after the same defaults up to
	 * (without) that dbname: taken literally it would name a database when the string
	 * names none. */
	const char *const keys[] = { "application_name",
				     "keepalives",
				     "keepalives_idle",
				     "keepalives_interval",
				     "keepalives_count",
				     "dbname",
				     NULL };
	const char *const values[] = { pg->cfg.application_name, "1", "10", "5", "3",
				       pg->cfg.conninfo,         NULL };
	const char *const hkeys_defaults[] = { keys[0], keys[1], keys[2], keys[3], keys[4], NULL };
	const char *const *hkeys, *const *hvalues;

	if (!pg->hosts)
		pg->conn = PQconnectStartParams(keys, values, 1);
	else if (pg_hosts_params(pg->hosts, pg->first, hkeys_defaults, values, &hkeys, &hvalues))
		pg->conn = PQconnectStartParams(hkeys, hvalues, 0);
	if (!pg->conn || PQstatus(pg->conn) == CONNECTION_BAD) {
		lose_connection(pg, pg->conn ? PQerrorMessage(pg->conn) : "out of memory");
		return;
	}
	pg->state = PG_CONNECTING;
	pg->at = 0;
	pg->addr[0] = '\0';
	arm_timer(pg, pg->hosts ? pg->host_timeout : CONNECT_TIMEOUT);
	note_host(pg);
	watch(pg, false, true);
}

/* A round of attempts: every host gets its turn, from `first` on. */
static void start_connect(struct pg *pg)
{
	pg->round_left = pg->hosts ? pg_hosts_count(pg->hosts) : 1;
	connect_attempt(pg);
}

int pg_open(struct pg **out, const struct pg_config *cfg)
{
	struct pg *pg = calloc(1, sizeof(*pg));

	*out = NULL;
	if (!pg)
		return -ENOMEM;
	pg->cfg = *cfg;
	if (pg->cfg.run_timeout <= 0)
		pg->cfg.run_timeout = 10;
	pg->backoff = BACKOFF_MIN;
	pg->cancel_fd = -1;
	pg->hosts = pg_hosts_parse(cfg->conninfo);
	if (pg->hosts)
		pg->host_timeout = pg_hosts_timeout(pg->hosts, HOST_CONNECT_TIMEOUT);
	pg->io = event_new(cfg->base, -1, 0, on_io, pg);
	pg->timer = evtimer_new(cfg->base, on_timer, pg);
	if (!pg->io || !pg->timer) {
		pg_close(&pg);
		return -ENOMEM;
	}
	snprintf(pg->error, sizeof(pg->error), "connecting");
	start_connect(pg);
	*out = pg;
	return 0;
}

void pg_close(struct pg **pgp)
{
	struct pg *pg = *pgp;

	if (!pg)
		return;
	if (pg->io)
		event_free(pg->io);
	if (pg->timer)
		event_free(pg->timer);
	stop_cancel_wait(pg);
	clear_results(pg);
	free(pg->results);
	if (pg->conn)
		PQfinish(pg->conn);
	pg_hosts_free(&pg->hosts);
	free(pg);
	*pgp = NULL;
}

bool pg_ready(const struct pg *pg)
{
	return pg->state == PG_IDLE;
}

bool pg_connected(const struct pg *pg)
{
	return pg->state == PG_IDLE || pg->state == PG_RUNNING;
}

const char *pg_last_error(const struct pg *pg)
{
	return pg->error;
}

int pg_backend_pid(const struct pg *pg)
{
	return pg->conn && (pg->state == PG_IDLE || pg->state == PG_RUNNING)
		       ? PQbackendPID(pg->conn)
		       : 0;
}

/* Room for one more result; false when memory ran out. */
static bool reserve_slot(struct pg *pg)
{
	size_t cap = pg->cap ? 2 * pg->cap : 64;
	PGresult **grown;

	if (pg->queued < pg->cap)
		return true;
	grown = realloc(pg->results, cap * sizeof(*grown));
	if (!grown)
		return false;
	pg->results = grown;
	pg->cap = cap;
	return true;
}

static bool queued(struct pg *pg, int ok)
{
	if (!ok) {
		lose_connection(pg, PQerrorMessage(pg->conn));
		return false;
	}
	pg->results[pg->queued++] = NULL;
	return true;
}

/* Out of memory for a result slot: the statements already queued cannot be taken
 * back out of libpq's buffer, so the connection is reset (its caller hears false). */
static bool no_slot(struct pg *pg)
{
	lose_connection(pg, "out of memory queueing a statement");
	return false;
}

bool pg_queue(struct pg *pg, const char *statement, int nparams, const char *const *values)
{
	if (pg->state != PG_IDLE)
		return false;
	if (!reserve_slot(pg))
		return no_slot(pg);
	return queued(pg, PQsendQueryPrepared(pg->conn, statement, nparams, values, NULL, NULL, 0));
}

bool pg_queue_sql(struct pg *pg, const char *sql, int nparams, const char *const *values)
{
	if (pg->state != PG_IDLE)
		return false;
	if (!reserve_slot(pg))
		return no_slot(pg);
	return queued(pg, PQsendQueryParams(pg->conn, sql, nparams, NULL, values, NULL, NULL, 0));
}

bool pg_queue_params(struct pg *pg, const char *statement, int nparams, const char *const *values,
		     const int *lengths, const int *formats, bool binary_results)
{
	if (pg->state != PG_IDLE)
		return false;
	if (!reserve_slot(pg))
		return no_slot(pg);
	return queued(pg, PQsendQueryPrepared(pg->conn, statement, nparams, values, lengths,
					      formats, binary_results ? 1 : 0));
}

bool pg_run(struct pg *pg, pg_done_cb done, void *arg)
{
	if (pg->state != PG_IDLE)
		return false;
	if (!PQpipelineSync(pg->conn)) {
		/* Whatever it buffered must not leave with PQfinish: see lose_connection. */
		shutdown(PQsocket(pg->conn), SHUT_WR);
		lose_connection(pg, PQerrorMessage(pg->conn));
		return false;
	}
	pg->state = PG_RUNNING;
	pg->done = done;
	pg->done_arg = arg;
	pg->current = 0;
	pg->current_has_result = false;
	pg->sync_sent = false;
	arm_timer(pg, pg->cfg.run_timeout);
	flush(pg);
	return pg->conn != NULL;
}

/* Quote and escape value into out (room for 2 * strlen(value) + 2); its length. */
static size_t array_element(char *out, const char *value)
{
	char *p = out;

	*p++ = '"';
	/* Runs between the characters to escape go in at once. */
	for (const char *s = value;;) {
		size_t run = strcspn(s, "\"\\");
		memcpy(p, s, run);
		p += run;
		s += run;
		if (!*s)
			break;
		*p++ = '\\';
		*p++ = *s++;
	}
	*p++ = '"';
	return (size_t)(p - out);
}

/* The same piece by piece, when no room for the whole element could be reserved. */
static void array_append_slowly(struct evbuffer *buf, const char *value, bool first)
{
	if (!first)
		evbuffer_add(buf, ",", 1);
	evbuffer_add(buf, "\"", 1);
	for (const char *p = value;;) {
		size_t run = strcspn(p, "\"\\");
		evbuffer_add(buf, p, run);
		p += run;
		if (!*p)
			break;
		evbuffer_add(buf, "\\", 1);
		evbuffer_add(buf, p++, 1);
	}
	evbuffer_add(buf, "\"", 1);
}

void pg_array_append(struct evbuffer *buf, const char *value, bool first)
{
	struct evbuffer_iovec v;
	size_t len;
	char *p;

	if (!value) {
		evbuffer_add(buf, first ? "NULL" : ",NULL", first ? 4 : 5);
		return;
	}
	/* Written in place: one reservation instead of an evbuffer_add per run (every
	 * event's JSON comes through here, with a quote every few bytes). */
	len = strlen(value);
	if (evbuffer_reserve_space(buf, (ev_ssize_t)(2 * len + 3), &v, 1) != 1) {
		array_append_slowly(buf, value, first);
		return;
	}
	p = v.iov_base;
	if (!first)
		*p++ = ',';
	p += array_element(p, value);
	v.iov_len = (size_t)(p - (char *)v.iov_base);
	evbuffer_commit_space(buf, &v, 1);
}

static void put_be32(unsigned char *out, uint32_t v)
{
	out[0] = (unsigned char)(v >> 24);
	out[1] = (unsigned char)(v >> 16);
	out[2] = (unsigned char)(v >> 8);
	out[3] = (unsigned char)v;
}

/* The array's header: ndim, has-null flag, element type; for one dimension its length
 * and lower bound (an empty array has no dimension). Written last, into the room left. */
#define BIN_HEADER 20

/* One element: its length (-1: NULL), then its bytes, in place. */
static void bin_element(struct pg_bin_array *a, const void *value, int32_t len)
{
	size_t more = 4 + (len > 0 ? (size_t)len : 0), cap, need;
	char *p;

	if (a->failed)
		return;
	need = (a->len ? a->len : BIN_HEADER) + more;
	if (need > a->cap) {
		for (cap = a->cap ? 2 * a->cap : 1024; cap < need; cap *= 2)
			;
		if (!(p = realloc(a->p, cap))) {
			a->failed = true;
			return;
		}
		a->p = p;
		a->cap = cap;
	}
	if (!a->len)
		a->len = BIN_HEADER;
	put_be32((unsigned char *)a->p + a->len, (uint32_t)len);
	if (len > 0)
		memcpy(a->p + a->len + 4, value, (size_t)len);
	a->len += more;
	a->n++;
}

void pg_bin_text(struct pg_bin_array *a, const char *value)
{
	if (!value)
		a->has_null = true;
	bin_element(a, value, value ? (int32_t)strlen(value) : -1);
}

void pg_bin_int8(struct pg_bin_array *a, int64_t value)
{
	unsigned char b[8];

	put_be32(b, (uint32_t)((uint64_t)value >> 32));
	put_be32(b + 4, (uint32_t)value);
	bin_element(a, b, sizeof(b));
}

void pg_bin_int4(struct pg_bin_array *a, int32_t value)
{
	unsigned char b[4];

	put_be32(b, (uint32_t)value);
	bin_element(a, b, sizeof(b));
}

void pg_bin_bool(struct pg_bin_array *a, bool value)
{
	unsigned char b = value ? 1 : 0;

	bin_element(a, &b, 1);
}

char *pg_bin_array_take(struct pg_bin_array *a, int *len)
{
	unsigned char *h;
	char *out;
	size_t skip = a->n ? 0 : 8; /* an empty array: no dimension */

	if (!a->len && !a->failed && !(a->p = malloc(a->cap = BIN_HEADER)))
		a->failed = true;
	if (!a->len)
		a->len = BIN_HEADER;
	if (a->failed || a->len > (size_t)INT32_MAX) {
		pg_bin_array_free(a);
		return NULL;
	}
	h = (unsigned char *)a->p;
	put_be32(h + skip, a->n ? 1 : 0);
	put_be32(h + skip + 4, a->has_null ? 1 : 0);
	put_be32(h + skip + 8, (uint32_t)a->type);
	if (a->n) {
		put_be32(h + 12, (uint32_t)a->n);
		put_be32(h + 16, 1);
	}
	if (skip)
		memmove(a->p, a->p + skip, a->len - skip);
	*len = (int)(a->len - skip);
	out = a->p;
	*a = (struct pg_bin_array){ .type = a->type };
	return out;
}

void pg_bin_array_free(struct pg_bin_array *a)
{
	free(a->p);
	*a = (struct pg_bin_array){ .type = a->type };
}

uint64_t pg_bin_uint(const char *p, int bytes)
{
	uint64_t v = 0;

	for (int i = 0; i < bytes; i++)
		v = v << 8 | (unsigned char)p[i];
	return v;
}

const char *pg_sqlstate(const PGresult *res)
{
	const char *s = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	return s ? s : "";
}
